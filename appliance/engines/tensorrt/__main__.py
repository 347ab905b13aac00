"""``python -m appliance.engines.tensorrt``: build a plan, or (internal) run one build child."""

import sys

from appliance.engines.tensorrt.build import main

sys.exit(main())
