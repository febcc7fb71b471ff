"""The training engine both stages share: set-up (Accelerate, build, prepare, restore), the one loop and
its step, the optimizer and schedule, checkpoints, the run folder and its lock, stop signals, the log
window, trackers, the configured loader, and how an entry script's errors become exit codes.
"""
