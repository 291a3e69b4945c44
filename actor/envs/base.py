"""The environment API the actor drives: defined in `shared/env_api.py` (so that the broker can
load a user's environment module for its tasks without the actor's stack) and re-exported
here, where the built-in environments import it from."""

from shared.env_api import *  # noqa: F403
from shared.env_api import __all__ as __all__
