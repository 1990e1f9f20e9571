"""The environment variables a launcher (deepspeed, torchrun / torch elastic) sets for its ranks.

A process that starts runs of its own (the experiment driver, the benchmarks) removes them from the
child's environment, or the child would try to join the parent's process group. Kept free of
torch imports so light tools can use it.
"""

LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
