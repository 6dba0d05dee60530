import pytest
import torch
import transformers as T

import petune
from conftest import BUILDERS, batch, first_output, forward_batch, probe_loss, tiny

METHODS = {
    "adapter": dict(reduction_factor=4),
    "adapter-houlsby": dict(d=8, placement="houlsby"),
    "lora": dict(r=4),
    "ia3": {},
    "prompt": dict(num_virtual_tokens=5),
}


def method_args(key):
    return key.split("-")[0], METHODS[key]


CASES = [(m, a) for m in METHODS for a in BUILDERS]


def t5_base_tuned(method, options):
    """``attach`` on T5-base shapes (d_model 768, 12+12 layers, d_ff 3072; a small vocab) on the
    meta device: exact counts without allocating or initialising 220M weights (the methods' own
    layers are made there too)."""
    with torch.device("meta"):
        model = T.T5ForConditionalGeneration(T.T5Config(d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                                                        num_decoder_layers=12, num_heads=12, vocab_size=64))
        return petune.attach(model, method, **options)


@pytest.mark.parametrize("method,options,expected", [
    ("adapter", dict(reduction_factor=8), 3_559_680),
    ("adapter", dict(d=96), 3_559_680),
    ("adapter", dict(reduction_factor=8, placement="houlsby"), 7_119_360),
    ("lora", dict(r=8), 884_736),
    ("ia3", {}, 129_024),
    ("prompt", dict(num_virtual_tokens=100), 76_800),
])
def test_exact_counts_on_t5_base(method, options, expected):
    tuned = t5_base_tuned(method, options)
    report = tuned.trainable_report()
    assert report.trainable == expected
    assert sum(p.numel() for p in tuned.parameters() if p.requires_grad) == expected
    assert report.as_dict()["percent"] == pytest.approx(100 * expected / report.total)
    assert f"{expected:,}" in str(report)


@pytest.mark.parametrize("key,arch", CASES)
def test_one_step_changes_only_the_method(key, arch):
    method, options = method_args(key)
    model = tiny(arch)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = petune.attach(model, method, **options)
    params = tuned.tuned_parameters()
    assert params and all(p.requires_grad for p in params.values())
    assert {n for n, p in tuned.model.named_parameters() if p.requires_grad} == set(params)
    tuned_before = {n: p.detach().clone() for n, p in params.items()}

    tuned.train()
    out = tuned(**forward_batch(arch, batch()))
    loss = out.loss if getattr(out, "loss", None) is not None else probe_loss(out)
    loss.backward()
    torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=1.0).step()

    changed = [n for n, p in params.items() if not torch.equal(p, tuned_before[n])]
    assert changed, "no tuned parameter moved"
    for name, p in tuned.base_model.named_parameters():
        if name in base_before:  # an original base parameter (adapters keep names, peft prefixes)
            assert torch.equal(p, base_before[name]), name
    base_now = {n.replace("base_model.model.", ""): p for n, p in tuned.model.named_parameters()}
    for name, before in base_before.items():
        now = base_now.get(name) if name in base_now else dict(tuned.base_model.named_parameters()).get(name)
        if now is None:  # peft renames targeted Linear weights to <name>.base_layer.weight
            now = base_now[name.rsplit(".", 1)[0] + ".base_layer." + name.rsplit(".", 1)[1]]
        assert torch.equal(now, before), name


@pytest.mark.parametrize("key", list(METHODS))
@pytest.mark.parametrize("arch", ["t5", "bart", "bert2bert"])
def test_multitask_switching_and_gradient_routing(key, arch):
    method, options = method_args(key)
    tuned = petune.attach(tiny(arch), method, tasks=["qa", "topic"], **options)
    report = tuned.trainable_report()
    assert set(report.per_task) == {"qa", "topic"} and report.per_task["qa"] == report.per_task["topic"]
    assert report.trainable == 2 * report.per_task["qa"]
    # make the two modules differ (fresh LoRA B / (IA)^3 vectors are identity-like)
    with torch.no_grad():
        for p in tuned.task_parameters("topic").values():
            p.add_(0.5 * torch.randn_like(p))
    b = forward_batch(arch, batch())
    tuned.eval()
    with torch.no_grad():
        a = first_output(tuned(**b, task="qa"))
        c = first_output(tuned(**b, task="topic"))
    assert not torch.allclose(a, c)

    tuned.train()
    tuned.zero_grad()
    probe_loss(tuned(**b, task="qa")).backward()
    qa, topic = tuned.task_parameters("qa"), tuned.task_parameters("topic")
    assert all(p.requires_grad for p in {**qa, **topic}.values()), "switching froze a task"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in qa.values())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in topic.values())


def test_shared_module_serves_all_tasks():
    tuned = petune.attach(tiny("t5"), "lora", tasks=["qa", "topic"], shared=True)
    assert tuned.trainable_report().per_task["qa"] == tuned.trainable_report().trainable
    assert tuned.task_parameters("qa") == tuned.task_parameters("topic")
    with tuned.task("topic"):
        assert tuned.active_task == "topic"


@pytest.mark.parametrize("key", list(METHODS))
@pytest.mark.parametrize("arch", ["t5", "bart", "bert2bert"])
def test_encoder_states_match_the_full_forward(key, arch):
    """encoder_states() is what the full model's encoder computes (prompt included)."""
    method, options = method_args(key)
    tuned = petune.attach(tiny(arch), method, **options)
    with torch.no_grad():
        for p in tuned.tuned_parameters().values():
            p.add_(0.1 * torch.randn_like(p))
    b = batch()
    with torch.no_grad():
        states, mask = tuned.encoder_states(b["input_ids"], b["attention_mask"])
        full = tuned(**b).encoder_last_hidden_state
    extra = options.get("num_virtual_tokens", 0) if method == "prompt" else 0
    assert states.shape == (3, 7 + extra, tiny(arch).config.encoder.hidden_size if arch == "bert2bert" else 32)
    assert mask.shape == states.shape[:2] and mask[:, :extra].all()
    torch.testing.assert_close(states, full)


def test_prompt_init_from_text_on_real_model(minilm_bert2bert, minilm_path, minilm_tokenizer):
    text = "retrieve the news article for this headline"
    tuned = petune.attach(minilm_bert2bert, "prompt", num_virtual_tokens=4, init_text=text, tokenizer=minilm_path)
    ids = minilm_tokenizer(text)["input_ids"][:4]  # peft tokenizes with special tokens: [CLS] first
    words = tuned.base_model.get_encoder().embeddings.word_embeddings.weight[ids]
    prompt = next(iter(tuned.tuned_parameters().values()))
    torch.testing.assert_close(prompt, words)
    enc = minilm_tokenizer(["a headline", "another one"], return_tensors="pt", padding=True)
    states, mask = tuned.encoder_states(enc["input_ids"], enc["attention_mask"])
    assert states.shape[:2] == (2, enc["input_ids"].shape[1] + 4) and states.shape[2] == 384


def test_real_minilm_bert2bert_adapter_generates(minilm_bert2bert, minilm_tokenizer):
    tuned = petune.attach(minilm_bert2bert, "adapter", reduction_factor=8)
    # 6 encoder + 6 decoder layers, d = 384 / 8 = 48: (2 * 384 * 48 + 48 + 384) per layer
    assert tuned.trainable_report().trainable == 12 * (2 * 384 * 48 + 48 + 384)
    enc = minilm_tokenizer(["what is the capital of France?"], return_tensors="pt", return_token_type_ids=False)
    out = tuned.model.generate(**enc, max_new_tokens=3)
    assert out.shape[0] == 1 and out.shape[1] >= 2


# -- user methods ---------------------------------------------------------------------------
def test_register_function_method():
    @petune.register_method("test-bitfit")
    def bitfit(model, bias_only_in="encoder"):
        for name, p in model.named_parameters():
            if name.endswith(".bias") and bias_only_in in name:
                p.requires_grad_(True)

    assert "test-bitfit" in petune.methods()
    tuned = petune.attach(tiny("bart"), "test-bitfit")
    names = list(tuned.tuned_parameters())
    assert names and all(n.endswith(".bias") and "encoder" in n for n in names)
    with pytest.raises(ValueError, match="only one shared module"):
        petune.attach(tiny("bart"), "test-bitfit", tasks=["a", "b"])
    with pytest.raises(ValueError, match="already registered"):
        petune.register_method("test-bitfit")(bitfit)


def test_register_method_class():
    @petune.register_method("test-lora-qk")
    class LoraQK(petune.get_method("lora")):
        def __init__(self, r=2):
            super().__init__(r=r, target_modules=["q", "k"])

    tuned = petune.attach(tiny("t5"), "test-lora-qk", tasks=["qa", "topic"])
    # 6 attention modules (2 encoder self, 2 decoder self, 2 cross) x (q, k) x r * (32 in + 32 out)
    assert tuned.trainable_report().per_task["qa"] == 6 * 2 * 2 * (32 + 32)
    assert tuned.method.library == "peft"


# -- errors ---------------------------------------------------------------------------------
def test_unknown_method_lists_registered():
    with pytest.raises(ValueError, match=r"unknown method 'dora'.*adapter.*ia3.*lora.*prompt"):
        petune.attach(tiny("t5"), "dora")


def test_not_an_encoder_decoder():
    bert = T.BertModel(T.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32))
    with pytest.raises(TypeError, match="not an encoder-decoder"):
        petune.attach(bert, "lora")
    with pytest.raises(TypeError, match="Hugging Face transformers model"):
        petune.attach(torch.nn.Linear(2, 2), "lora")


@pytest.mark.parametrize("options,match", [
    (dict(d=8, reduction_factor=4), "exactly one of d"),
    ({}, "exactly one of d"),
    (dict(d=0), "positive"),
    (dict(reduction_factor=-2), "positive"),
    (dict(d=7), r"d=7 does not divide d_model=32.*\[4, 8\]"),
    (dict(d=8, placement="middle"), "placement"),
])
def test_adapter_size_errors_leave_model_untouched(options, match):
    model = tiny("t5")
    with pytest.raises(ValueError, match=match):
        petune.attach(model, "adapter", **options)
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "adapters_config") or not model.adapters_config.adapters
    petune.attach(model, "adapter", d=8)  # still attachable


def test_reduction_factor_that_does_not_divide_warns():
    with pytest.warns(UserWarning, match=r"floor\(32 / 5\) = 6"):
        tuned = petune.attach(tiny("t5"), "adapter", reduction_factor=5)
    assert tuned.method.width == 6


@pytest.mark.parametrize("method,options,match", [
    ("lora", dict(r=0), "positive integer"),
    ("lora", dict(dropout=1.5), r"\[0, 1\)"),
    ("prompt", dict(num_virtual_tokens=-1), "positive integer"),
    ("prompt", dict(init_text="hello"), "needs tokenizer"),
    ("ia3", dict(target_modules=["k"], feedforward_modules=["wo"]), "subset"),
    ("lora", dict(rank=8), "unexpected keyword"),
])
def test_bad_options(method, options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        petune.attach(tiny("t5"), method, **options)


def test_adapter_implementation_per_architecture():
    """The adapters library where it supports the architecture, petune's bottleneck elsewhere."""
    assert petune.attach(tiny("t5"), "adapter", d=8).method.library == "adapters"
    tuned = petune.attach(tiny("pegasus"), "adapter", d=8)
    assert tuned.method.library == "petune"
    assert all(".petune_bottlenecks.default." in "." + n for n in tuned.tuned_parameters())


def test_architecture_outside_peft_tables_gets_structural_targets():
    torch.manual_seed(0)
    led = T.LEDForConditionalGeneration(T.LEDConfig(vocab_size=60, d_model=16, encoder_layers=1, decoder_layers=1,
                                                    encoder_attention_heads=2, decoder_attention_heads=2,
                                                    encoder_ffn_dim=32, decoder_ffn_dim=32, attention_window=4,
                                                    max_encoder_position_embeddings=32,
                                                    max_decoder_position_embeddings=32))
    tuned = petune.attach(led, "lora")  # peft has no LED table: found by structure
    assert tuned.method.options["target_modules"] == ["query", "q_proj", "value", "v_proj"]
    led2 = T.LEDForConditionalGeneration(led.config)
    assert petune.attach(led2, "lora", target_modules=["q_proj", "v_proj"]).trainable_report().trainable > 0


def test_task_errors():
    with pytest.raises(ValueError, match="shared=False needs tasks"):
        petune.attach(tiny("t5"), "lora", shared=False)
    with pytest.raises(ValueError, match="unique"):
        petune.attach(tiny("t5"), "lora", tasks=["a", "a"])
    with pytest.raises(ValueError, match="list of task names"):
        petune.attach(tiny("t5"), "lora", tasks="a")
    tuned = petune.attach(tiny("t5"), "lora", tasks=["qa", "topic"])
    with pytest.raises(ValueError, match=r"unknown task 'c'; tasks: \['qa', 'topic'\]"):
        tuned.use_task("c")
    with pytest.raises(ValueError, match="one module per task"):
        tuned.use_task(None)


@pytest.mark.parametrize("method,options", [("lora", {}), ("adapter", dict(d=8))])
def test_attaching_twice(method, options):
    model = tiny("t5")
    tuned = petune.attach(model, method, **options)
    with pytest.raises(ValueError, match="already"):
        petune.attach(model, "ia3")
    with pytest.raises(TypeError):
        petune.attach(tuned, "ia3")
