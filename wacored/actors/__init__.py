"""What moves a message on: the lanes and their forwarders, the DLQ retrier, the reaper, the stats and
pause-watch actors, and the supervisor every actor runs under."""
