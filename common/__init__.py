"""What both `core` and `db` stand on: configuration from the environment and the one error tree."""
