"""What operators ask of the store: dead letters, messages (show, list, replay), pauses, the status
report; shared by the CLI and the admin API."""
