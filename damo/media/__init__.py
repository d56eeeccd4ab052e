"""Object storage (plain paths, file://, s3://) and media decoding."""
