"""rlhf: SFT, reward models, DPO and PPO on Hugging Face models, on one Trainer."""

from .config import DPOConfig, PPOConfig, RewardConfig, SFTConfig, TrainConfig, load_config
from .models.loading import load_reward_model
from .trainer import Trainer

__version__ = "0.1.0"
__all__ = ["DPOConfig", "PPOConfig", "RewardConfig", "SFTConfig", "TrainConfig", "Trainer", "load_config",
           "load_reward_model"]
