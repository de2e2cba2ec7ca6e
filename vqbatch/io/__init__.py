"""Reading prompt shards and writing images and metadata (local or S3)."""
