"""Privacy profiles: named upload settings on the privacy–accuracy frontier (``privacy.profile``), and how a
config takes one (:func:`apply_privacy_profile`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from feddymem.config.choices import (
    PrivacyProfile,
    Reduce,
)
from feddymem.errors import ConfigError


@dataclass(frozen=True)
class ProfileSetting:
    """One upload setting a privacy profile fixes: the dotted key, its value, and which way is more private."""

    key: str
    value: Any
    more_private: str  # "higher" or "lower": an explicit value on this side of ``value`` is allowed


# strict: the knee of benchmarks/privacy/frontier, the most accurate setting measured there whose membership
# AUC stays <= 0.70 on ELPV, industrial and medical: each item the mean of 15 patches of 15 distinct images
# (also for cluster_mean: min_images_per_item), half the items (coreset_ratio 0.02 -> 0.01).
PRIVACY_PROFILES: dict[PrivacyProfile, tuple[ProfileSetting, ...]] = {
    PrivacyProfile.standard: (),
    PrivacyProfile.strict: (
        ProfileSetting("memory.min_cluster_size", 15, "higher"),
        ProfileSetting("memory.min_images_per_item", 15, "higher"),
        ProfileSetting("memory.coreset_ratio", 0.01, "lower"),
    ),
}


def apply_privacy_profile(cfg: DictConfig, overrides: DictConfig) -> None:
    """Set the upload settings of ``privacy.profile`` (:data:`PRIVACY_PROFILES`). An override in
    ``overrides`` may make one more private, never less: that is a ConfigError naming the key."""
    profile = PrivacyProfile(cfg.privacy.profile)
    for setting in PRIVACY_PROFILES[profile]:
        given = OmegaConf.select(overrides, setting.key)
        if given is None:
            OmegaConf.update(cfg, setting.key, setting.value)
            continue
        if (given < setting.value) if setting.more_private == "higher" else (given > setting.value):
            raise ConfigError(
                f"privacy.profile={profile.value} sets '{setting.key}' to {setting.value}; "
                f"'{setting.key}={given}' would make uploads less private"
            )
    if profile is not PrivacyProfile.standard and cfg.memory.reduce == Reduce.coreset:
        raise ConfigError(f"privacy.profile={profile.value} cannot upload raw patches (memory.reduce=coreset)")
