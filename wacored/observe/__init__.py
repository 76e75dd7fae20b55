"""What shows what the daemon does: metrics, traces, JSON logs, SLOs, systemd notifications, and the
counts and states they read."""
