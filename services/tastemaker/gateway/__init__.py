"""The gRPC edge: protobuf ↔ domain conversion and validation (`convert`), the one error table
(`errors`), and the ingress deployment (`deployment`)."""
