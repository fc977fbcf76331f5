"""Session-wide test settings.

jax reads XLA_FLAGS once, at its first import, so the 8 fake CPU devices that sharding tests
need must be requested here, before any test module imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
