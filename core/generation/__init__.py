"""The generation service: prepare, admit, route, run and settle one request."""
