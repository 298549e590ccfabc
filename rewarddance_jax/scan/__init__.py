"""The layout scanner: AOT-compiles the trainers' steps for TPU topologies on a CPU host.

It sits above train/ (it builds the trainers' steps) and below launch/scan_sharding.py:
layouts.py scans layouts into table rows; step.py holds `AbstractStep` and the shared abstract
helpers; flow.py, grpo.py and latent_reward.py build each step with abstract, sharded arguments.
The mesh, the rules and the AOT compile itself are parallel/ (mesh.py, sharding.py, aot.py).
"""
