"""Configuration: verl aliases resolve, impossible settings stop with a sentence naming the key."""

import pytest

from jaxsft import config


def _cfg(**overrides):
    c = config.default_config()
    c.model.partial_pretrain = "/m"
    c.data.train_files = "/d.parquet"
    for key, value in overrides.items():
        node = c
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return config.normalise(c)


def test_verl_aliases_resolve():
    c = _cfg(**{"model.fsdp_config.model_dtype": "bf16", "data.multiturn.messages_key": "conv"})
    assert c.model.param_dtype == "bfloat16"
    assert c.data.messages_key == "conv"
    config.validate(c, num_devices=8)


@pytest.mark.parametrize("overrides, devices, key", [
    ({"data.truncation": "middle"}, 8, "data.truncation"),
    ({"ulysses_sequence_parallel_size": 3}, 8, "ulysses_sequence_parallel_size"),
    ({"data.train_batch_size": 12}, 8, "data.train_batch_size"),
    ({"data.train_batch_size": 16, "data.micro_batch_size_per_gpu": 4}, 8, "data.micro_batch_size_per_gpu"),
    ({"trainer.save_freq": 0}, 8, "trainer.save_freq"),
    ({"data.chat_template": "x"}, 8, "data.chat_template"),
    ({"model.lora_rank": 8}, 8, "model.lora_rank"),
    ({"trainer.resume_mode": "resume_path"}, 8, "trainer.resume_from_path"),
    ({"trainer.loss_normalization": "verl", "data.packing": "first_fit"}, 8, "trainer.loss_normalization"),
    ({"model.fsdp_config.model_dtype": "fp16"}, 8, "model.fsdp_config.model_dtype"),
    ({"optim.lr_scheduler": "linear"}, 8, "optim.lr_scheduler"),
])
def test_bad_settings_name_the_key(overrides, devices, key):
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.validate(_cfg(**overrides), num_devices=devices)


def test_missing_model_and_data_are_named():
    c = config.normalise(config.default_config())
    with pytest.raises(config.ConfigError, match=r"model\.partial_pretrain"):
        config.validate(c)
