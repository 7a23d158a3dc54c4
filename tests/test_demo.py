"""The demonstration behind `make demo` runs and every optimizer learns."""

from lorajax import demo


def test_demo_runs_and_every_optimizer_reduces_the_loss(capsys):
    rows = demo.run(steps=40, batch=64)
    assert rows[0]["optimizer"] == "full AdamW"
    adam_state = rows[0]["state_bytes"]
    for row in rows:
        assert row["loss_after"] < 0.95 * row["loss_before"], row
        if row["optimizer"] != "full AdamW":
            assert row["state_bytes"] < 0.1 * adam_state, row
    demo.main(["--steps", "2", "--batch-size", "8"])
    out = capsys.readouterr().out
    assert "loss before" in out and "lora (adapter-free LoRA)" in out
