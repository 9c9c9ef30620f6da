"""The `ovseg` sub-commands that live outside a domain package (the command line itself is
cli.py): config.py (the engine's flags, shared by every sub-command that builds a Segmenter),
segment.py (`ovseg segment`) and bench.py (`ovseg bench`). `ovseg eval` is evaluation/cli.py and
`ovseg demo` is ros/demo.py."""
