"""Systems: parameter, KV-cache and FLOP accounting (`accounting`), expert parallelism (`parallel`) and pipeline
schedules (`pipeline`)."""
