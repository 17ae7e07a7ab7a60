"""Real-time user profiles: pure profile math (`state`), a shard of users (`shard`), and the Ray
actor shell around a shard (`actor`)."""
