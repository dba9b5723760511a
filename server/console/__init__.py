"""The operator console: a static page at /console that reads the public JSON API."""
