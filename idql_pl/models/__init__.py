"""The LightningModules: the critic (ImplicitCritic) and the diffusion behavior policy (DiffusionBehavior),
each trainable alone, composed into IDQL; online finetuning (OnlineIDQL) and the IQL baseline; their shared
base."""
