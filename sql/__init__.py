"""The numbered migrations (NNN_name.sql), applied in order by migrations.py; a package only so
that `pip install .` installs them beside it."""
