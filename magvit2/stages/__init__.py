"""Training stages. `run(cfg)` runs cfg.stage; the AR stage first finds or trains the tokenizer it needs."""


def run(cfg) -> dict:
    if cfg.stage == "tokenizer":
        from magvit2.stages.tokenizer import train_tokenizer
        return train_tokenizer(cfg)
    from magvit2.stages.ar import train_ar
    return train_ar(cfg)
