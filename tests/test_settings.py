"""Every generation setting the page offers reaches decoding. Sampling hot and unfiltered (temperature 5, top-k and
top-p off) scatters the tiny model's captions; from there each of temperature, top-k, top-p and the seed changes
the tokens sampling returns, through the library and through the page's /caption endpoint alike, so a setting
dropped on the way (the page passing a default, decoding ignoring one) fails here."""
from __future__ import annotations

from gradio_client import Client, handle_file

from conftest import image_for

RESULT = 4  # /caption returns (words, word overlay, CLS overlay, strip, result JSON, info)
HOT = dict(max_new_tokens=12, num_beams=1, do_sample=True, temperature=5.0, top_k=0, top_p=1.0, seed=0)
# one setting changed from HOT each; the first three leave only the likeliest token, i.e. greedy decoding
CHANGED = {"temperature": 0.05, "top_k": 1, "top_p": 0.01, "seed": 1}


def _sampled(cap, **change):
    return cap.caption(image_for(0), **{**HOT, **change}, method="attention").token_ids


def test_each_sampling_setting_changes_what_the_library_returns(tiny):
    hot = _sampled(tiny)
    greedy = tiny.caption(image_for(0), max_new_tokens=12, num_beams=1, method="attention").token_ids
    assert hot != greedy, "sampling hot must leave the greedy caption, or the settings below prove nothing"
    assert _sampled(tiny) == hot, "the same seed samples the same tokens"
    for name, value in CHANGED.items():
        got = _sampled(tiny, **{name: value})
        assert got != hot, f"{name}={value} changed nothing"
        if name != "seed":
            assert got == greedy, f"{name}={value} keeps only the likeliest token"



def test_each_sampling_setting_reaches_decoding_through_the_caption_endpoint(app_url, tiny, image_file):
    client = Client(app_url, analytics_enabled=False, verbose=False)

    def page(**change):
        settings = {**HOT, **change}
        return client.predict(handle_file(image_file), **settings, method="attention", api_name="/caption")[RESULT]

    hot = page()
    assert hot["token_ids"] == _sampled(tiny)
    for name, value in CHANGED.items():
        got = page(**{name: value})
        assert got["settings"][name] == value, f"the page decoded with {name}={got['settings'][name]}"
        assert got["token_ids"] == _sampled(tiny, **{name: value}) != hot["token_ids"], f"{name}={value}"
