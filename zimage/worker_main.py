"""What a worker process of workers.WorkerRunner runs first (through runpy, which the process is started with).

A host imports this engine under a name of its own (ComfyUI names a custom node's package after its folder path),
which a new process cannot import. The worker imports it afresh as the top-level package `zimage`, from the folder
this file's package sits in, and runs its loop (workers._work) with the arguments it was started with.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zimage.workers import _work  # noqa: E402

_work(*work_arguments)  # noqa: F821  (given by runpy.run_path's init_globals)
