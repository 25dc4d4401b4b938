"""Configuration: verl's defaults underneath, every key acts / is refused / says it is inert,
verl's and jaxsft's spellings of one setting agree, and every check names its key."""

import dataclasses

import pytest
from cfg import BASE, settings

from jaxsft import cli, config
from jaxsft.config.keys import BY_NAME, KEYS

# verl 0.7.0 verl/trainer/config/sft_trainer.yaml (the last release with the FSDP SFT trainer):
# the defaults a pasted verl launch line runs on top of (paths excepted: jaxsft requires them).
VERL_DEFAULTS = {
    "data.train_batch_size": 256, "data.micro_batch_size": None, "data.micro_batch_size_per_gpu": 4,
    "data.train_max_samples": -1, "data.val_max_samples": -1, "data.prompt_key": "question",
    "data.response_key": "answer", "data.prompt_dict_keys": None, "data.response_dict_keys": None,
    "data.multiturn.enable": False, "data.multiturn.messages_key": "messages", "data.multiturn.tools_key": "tools",
    "data.multiturn.enable_thinking_key": "enable_thinking", "data.max_length": 1024, "data.truncation": "error",
    "data.balance_dp_token": False, "data.chat_template": None, "data.custom_cls.path": None,
    "data.custom_cls.name": None, "data.use_shm": False, "data.apply_chat_template_kwargs": {},
    "model.use_shm": False, "model.fsdp_config.model_dtype": "fp32",
    "model.fsdp_config.wrap_policy.min_num_params": 0, "model.fsdp_config.cpu_offload": False,
    "model.fsdp_config.offload_params": False, "model.external_lib": None, "model.enable_gradient_checkpointing": True,
    "model.trust_remote_code": False, "model.lora_rank": 0, "model.lora_alpha": 16, "model.target_modules": "all-linear",
    "model.use_liger": False, "model.strategy": "fsdp2",
    "optim.lr": 1e-5, "optim.betas": [0.9, 0.95], "optim.weight_decay": 0.01, "optim.lr_warmup_steps_ratio": 0.1,
    "optim.clip_grad": 1.0, "optim.lr_scheduler": "cosine", "optim.optimizer": "AdamW",
    "optim.optimizer_impl": "torch.optim", "optim.total_training_steps": -1, "optim.lr_warmup_steps": -1,
    "optim.min_lr_ratio": 0.0, "optim.num_cycles": 0.5, "optim.override_optimizer_config": None,
    "ulysses_sequence_parallel_size": 1, "use_remove_padding": False,
    "trainer.default_local_dir": "checkpoints/${trainer.project_name}/${trainer.experiment_name}",
    "trainer.default_hdfs_dir": None, "trainer.project_name": "gsm8k-sft", "trainer.experiment_name": "test",
    "trainer.total_epochs": 4, "trainer.total_training_steps": None, "trainer.logger": ["console", "wandb"],
    "trainer.seed": 1, "trainer.save_freq": -1, "trainer.test_freq": -1, "trainer.nnodes": 1,
    "trainer.n_gpus_per_node": 8, "trainer.max_ckpt_to_keep": None, "trainer.resume_mode": "auto",
    "trainer.resume_from_path": None, "trainer.checkpoint.save_contents": ["model", "optimizer", "extra"],
    "trainer.device": "cuda",
}


def test_defaults_are_verls():
    for name, value in VERL_DEFAULTS.items():
        assert BY_NAME[name].default == value, name
        assert BY_NAME[name].verl, name
    s = config.settings_from({"data.train_files": "/t.parquet", "model.partial_pretrain": "/m", "trainer.logger": ["console"]})
    assert s.checkpoint.default_local_dir == "checkpoints/gsm8k-sft/test"  # verl's interpolation, resolved
    assert (s.data.train_batch_size, s.data.max_length, s.optim.lr, s.model.param_dtype) == (256, 1024, 1e-5, "float32")
    assert s.trainer.device == "cuda" and s.data.packing == "none" and s.model.remat_policy == "minimal"


# A non-default value for each key whose kind alone does not suggest a valid one.
SAMPLES = {
    "data.truncation": "right", "data.pad_mode": "no_padding", "model.strategy": "fsdp",
    "model.fsdp_config.model_dtype": "bf16", "model.param_dtype": "bfloat16", "model.compute_dtype": "float32",
    "model.remat_policy": "full", "model.attn_implementation": "xla", "optim.mu_dtype": "bfloat16",
    "optim.lr_scheduler": "wsd", "optim.optimizer": "Adam", "optim.optimizer_impl": "bitsandbytes.optim",
    "optim.betas": [0.8, 0.9], "optim.lr_warmup_steps_ratio": 0.2, "optim.min_lr_ratio": 0.1,
    "trainer.checkpoint.hf_dtype": "bfloat16", "trainer.checkpoint.max_shard_size": "1GB",
    "trainer.checkpoint.save_contents": ["model"], "trainer.checkpoint.load_contents": ["model"],
    "trainer.logger": ["console", "file"], "trainer.resume_mode": "disable", "trainer.device": "auto",
    "trainer.loss_normalization": "verl", "ulysses_sequence_parallel_size": 2, "trainer.save_freq": 5,
    "trainer.test_freq": "after_each_epoch", "model.target_modules": ["q_proj"], "data.max_length": 2048,
    "optim.total_training_steps": 10, "trainer.n_gpus_per_node": 4, "trainer.nnodes": 2,
    "data.train_weights": [2.0],  # one weight per file of BASE's data.train_files
    "data.multiturn.mask_mode": "whole_chat", "trainer.loss_type": "dft",
}


def _sample(key):
    if key.name in SAMPLES:
        return SAMPLES[key.name]
    if key.kind == "bool":
        return not key.default
    if key.kind in ("int", "freq"):
        return 3 if key.default in (None, -1, 0) else key.default + 1
    if key.kind == "float":
        return 0.5 if key.default in (None, 0.0) else key.default * 0.5
    if key.kind == "dict":
        return {"k": 1}
    if key.kind == "strs":
        return ["/other/file"]
    return "/other/value"


def _typed(s):
    return {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name not in ("config", "notes", "recipe")}


def test_every_key_acts_is_refused_or_says_it_is_inert():
    """Set each key (except the smoke recipe's own) to another value on top of verl's defaults:
    the typed settings change, or the resolution refuses it in a sentence naming the key, or it
    prints a note naming the key; an `inert` key must do the last."""
    base = _typed(settings())
    outcomes = {}
    for key in KEYS:
        if key.recipe_only:
            continue
        value = _sample(key)
        assert value != key.default, key.name
        try:
            s = settings({key.name: value})
        except config.ConfigError as e:
            assert key.name in str(e) and "\n" not in str(e), (key.name, str(e))
            assert not key.inert, key.name
            outcomes[key.name] = "refused"
            continue
        noted = any(n.startswith(key.name + "=") or key.name in n.split(" has no effect")[0] for n in s.notes)
        changed = _typed(s) != base
        if key.inert:
            assert noted and not changed, key.name
            outcomes[key.name] = "inert"
        else:
            assert changed or noted, f"{key.name}={value!r} changed nothing and said nothing"
            outcomes[key.name] = "acts" if changed else "noted"
    assert outcomes["model.lora_rank"] == "acts" and outcomes["model.use_liger"] == "inert"
    assert outcomes["model.lora_alpha"] == outcomes["model.lora_dropout"] == "noted"  # without LoRA: said, not ignored
    assert outcomes["model.fsdp_config.cpu_offload"] == "refused" and outcomes["model.trainable"] == "acts"
    assert outcomes["optim.min_lr_ratio"] == outcomes["trainer.log_every"] == outcomes["use_remove_padding"] == "acts"
    assert outcomes["trainer.loss_type"] == "acts"
    with pytest.raises(config.ConfigError) as e:  # an unknown loss: one line naming the key and the choices
        settings({"trainer.loss_type": "dpo"})
    assert str(e.value).startswith("trainer.loss_type='dpo'") and str(e.value).endswith("is not one of ce, dft")


def test_every_key_is_in_help_and_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("<!-- keys:start (cli.keys_table()) -->\n")[1].split("\n<!-- keys:end -->")[0]
    assert table == cli.keys_table(), "README's key table is stale: paste cli.keys_table() between its markers"
    text = cli.help_text()
    for key in KEYS:
        if not key.recipe_only:
            assert f"    {key.name} = " in text, key.name
            assert f"`{key.name}`" in table, f"README does not name {key.name}"


def test_two_spellings_of_one_setting():
    # verl's spellings act when given alone
    s = settings({"model.fsdp_config.model_dtype": "bf16", "model.enable_gradient_checkpointing": False,
                  "use_remove_padding": True, "data.multiturn.messages_key": "conv"})
    assert (s.model.param_dtype, s.model.remat_policy, s.data.packing, s.data.messages_key) == \
        ("bfloat16", "none", "first_fit", "conv")
    assert s.config["model"]["param_dtype"] == "bfloat16" and s.config["use_remove_padding"] is True
    # the command line wins over a recipe's other spelling
    s = config.settings_from({"model.fsdp_config.model_dtype": "fp32", "model.enable_gradient_checkpointing": False,
                              "data.train_files": "/t.parquet"}, recipe="qwen7b")
    assert (s.model.param_dtype, s.model.remat_policy) == ("float32", "none")
    assert s.config["model"]["fsdp_config"]["model_dtype"] == "fp32"
    # one source saying two things is refused, naming both keys
    for keys in ({"model.param_dtype": "float32", "model.fsdp_config.model_dtype": "bf16"},
                 {"model.remat_policy": "full", "model.enable_gradient_checkpointing": False},
                 {"data.packing": "none", "use_remove_padding": True}):
        with pytest.raises(config.ConfigError) as e:
            settings(keys)
        assert all(k in str(e.value) for k in keys)
    # packing under verl's loss normalisation says why
    with pytest.raises(config.ConfigError, match="use_remove_padding=true packs rows"):
        settings({"use_remove_padding": True, "trainer.loss_normalization": "verl"})


@pytest.mark.parametrize("keys, devices, key", [
    ({"data.truncation": "middle"}, 8, "data.truncation"),
    ({"ulysses_sequence_parallel_size": 3}, 8, "ulysses_sequence_parallel_size"),
    ({"data.train_batch_size": 12}, 8, "data.train_batch_size"),
    ({"data.train_batch_size": 16, "data.micro_batch_size_per_gpu": 4}, 8, "data.micro_batch_size_per_gpu"),
    ({"trainer.save_freq": 0}, 8, "trainer.save_freq"),
    ({"trainer.test_freq": "each_epoch"}, 8, "trainer.test_freq"),
    ({"data.chat_template": "x"}, 8, "data.chat_template"),
    ({"model.lora_rank": -1}, 8, "model.lora_rank"),
    ({"model.lora_rank": 8, "model.target_modules": "q_proj,embed_tokens"}, 8, "model.target_modules"),
    ({"model.trainable": "new_token_embeddings"}, 8, "model.added_tokens"),
    ({"model.added_tokens": 3}, 8, "model.added_tokens"),
    ({"trainer.resume_mode": "resume_path"}, 8, "trainer.resume_from_path"),
    ({"trainer.loss_normalization": "verl", "data.packing": "first_fit"}, 8, "trainer.loss_normalization"),
    ({"model.fsdp_config.model_dtype": "fp16"}, 8, "model.fsdp_config.model_dtype"),
    ({"optim.lr_scheduler": "linear"}, 8, "optim.lr_scheduler"),
    ({"optim.lr": "abc"}, 8, "optim.lr"),
    ({"optim.betas": [0.9]}, 8, "optim.betas"),
    ({"trainer.logger": ["console", "swanlab"]}, 8, "trainer.logger"),
    ({"trainer.checkpoint.max_shard_size": "lots"}, 8, "max_shard_size"),
    ({"data.max_length": 1.5}, 8, "data.max_length"),
    ({"trainer.total_epochs": None}, 8, "trainer.total_epochs"),
])
def test_bad_settings_name_the_key(keys, devices, key):
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")) as e:
        config.check_devices(settings(keys), devices)
    assert "\n" not in str(e.value)


def test_required_keys_are_named():
    for missing in ("data.train_files", "model.partial_pretrain"):
        with pytest.raises(config.ConfigError, match=missing.replace(".", r"\.")):
            config.settings_from({k: v for k, v in BASE.items() if k != missing})




def test_override_strings():
    import os

    s = config.settings_from(["data.train_files=/t.parquet", "model.partial_pretrain=/m", "trainer.logger=[console,file]",
                              "trainer.max_ckpt_to_keep=null", "data.val_files=null", "trainer.test_freq=after_each_epoch",
                              "trainer.default_local_dir=${oc.env:HOME}/ckpt/${trainer.experiment_name}",
                              "+data.ignore_input_ids_mismatch=true", "optim.betas=[0.9,0.99]",
                              "+data.apply_chat_template_kwargs.enable_thinking=false", "--config.optim.lr=3e-5",
                              '--config.trainer.checkpoint.save_contents=("model","optimizer")',
                              "--config.trainer.total_training_steps=None"])
    assert s.checkpoint.max_ckpt_to_keep == 0 and s.data.val_files == () and s.trainer.test_freq == "after_each_epoch"
    assert s.checkpoint.default_local_dir == os.path.join(os.environ["HOME"], "ckpt", "test")
    assert s.data.ignore_input_ids_mismatch and s.optim.betas == (0.9, 0.99) and s.optim.lr == 3e-5
    assert s.data.apply_chat_template_kwargs == {"enable_thinking": False}
    assert s.checkpoint.save_contents == ("model", "optimizer") and s.trainer.total_training_steps is None
    with pytest.raises(config.ConfigError, match=r"trainer\.default_local_dir='\$\{oc\.env:JAXSFT_SURELY_UNSET\}/x': "
                       r"cannot resolve the interpolation \(Environment variable 'JAXSFT_SURELY_UNSET' not found\)"):
        config.settings_from(["trainer.default_local_dir=${oc.env:JAXSFT_SURELY_UNSET}/x", *[f"{k}={v}" for k, v in
                                                                                        BASE.items() if k != "trainer.logger"]])
