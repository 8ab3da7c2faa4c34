"""Engine implementations; ``hetlm.train.engine`` defines the interface and picks one."""
