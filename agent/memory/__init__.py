"""Index runs of pages and blocks: (first, count) runs and back (agent.memory.scan).

Memory pre-copy itself runs on QEMU's own dirty log; ferry carries QEMU's migration stream.
"""
