"""Where bytes live and how they are copied inside a process: device resolution, arenas, pools,
the copy executor."""
