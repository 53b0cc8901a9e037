"""Scale-out: process environment and collectives (env.py), the DeepSpeed config generated from the
TrainConfig (deepspeed_config.py), and the training engines for one process, DDP and ZeRO-1/2/3
(engine.py)."""
