"""tunebot's Slack side: configuration, app, listeners, rendering, CLI."""
