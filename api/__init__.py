"""The REST API (FastAPI): generation jobs, images and health for applications; every rule stays in core."""
