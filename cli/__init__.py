"""The fpo command line."""

import os

# Axolotl sends usage telemetry unless told not to, and on a machine without network its
# retries only add noise and delay; `fpo` opts out by default (a value already set wins).
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
