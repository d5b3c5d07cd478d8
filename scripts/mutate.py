"""Does the suite catch a broken rule? Apply one wrong one-line change at a time (to a rule README states about
maps, decoding, limits or the page) to a copy of the project, run the default-suite test file that should catch
it, and print a Markdown row per change: the first test that failed, or NOT CAUGHT.

    .venv/bin/python scripts/mutate.py            # all changes, about 30 minutes on 2 cores
    .venv/bin/python scripts/mutate.py 3 4        # only changes 3 and 4
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = str(Path(__file__).resolve().parent.parent)
MUT = [
 ("word j explained by row j instead of j-1 (forced pass)", "captioner/forcing.py", "cross = torch.stack([a[0, :, :-1] for a in out.cross_attentions])", "cross = torch.stack([a[0, :, 1:] for a in out.cross_attentions])", "tests/test_captioner.py"),
 ("word j explained by row j+1 (recorded while decoding)", "captioner/fastdecode.py", "cross = torch.stack([steps.attn[s][r] for s, r in enumerate(rows)], 2)", "cross = torch.stack([steps.attn[min(s + 1, len(rows) - 1)][r] for s, r in enumerate(rows)], 2)", "tests/test_captioner.py"),
 ("rollout residual 0.9 A + 0.1 I", "captioner/attention.py", "a = 0.5 * a + 0.5 * eye", "a = 0.9 * a + 0.1 * eye", "tests/test_rules.py"),
 ("rollout multiplied last layer first", "captioner/attention.py", "joint = (a / a.sum(-1, keepdim=True)) @ joint", "joint = joint @ (a / a.sum(-1, keepdim=True))", "tests/test_rules.py"),
 ("relevance keeps negative gradient x attention", "captioner/relevance.py", "return (grad * attn).clamp(min=0).mean(-3)", "return (grad * attn).mean(-3)", "tests/test_rules.py"),
 ("relevance R-hat without the identity put back", "captioner/relevance.py", "torch.zeros_like(bar)) + eye", "torch.zeros_like(bar))", "tests/test_rules.py"),
 ("relevance cross term without R-hat_tt", "captioner/relevance.py", "r_ti = r_ti + _normalised(r_tt).transpose(-1, -2) @ cross_a @ r_ii_hat", "r_ti = r_ti + cross_a @ r_ii_hat", "tests/test_rules.py"),
 ("relevance cross term without R-hat_ii", "captioner/relevance.py", "r_ti = r_ti + _normalised(r_tt).transpose(-1, -2) @ cross_a @ r_ii_hat", "r_ti = r_ti + _normalised(r_tt).transpose(-1, -2) @ cross_a", "tests/test_rules.py"),
 ("encoder relevance accumulated on the right", "captioner/relevance.py", "r_ii = r_ii + a @ r_ii", "r_ii = r_ii + r_ii @ a", "tests/test_rules.py"),
 ("LM-head gradient read one row late", "captioner/relevance.py", "grad_h = targets.to(g)[:, :, None] * g[0, :T]", "grad_h = targets.to(g)[:, :, None] * g[0, 1:T + 1]", "tests/test_rules.py"),
 ("last key dropped instead of the CLS key", "captioner/attention.py", "return rows[..., prefix:].reshape", "return rows[..., :-prefix].reshape", "tests/test_captioner.py"),
 ("CLS map from a patch's query row", "captioner/attention.py", "head)[0]  # (N,): the CLS query", "head)[1]  # (N,): the CLS query", "tests/test_captioner.py"),
 ("a word's map = its first token's map", "captioner/attention.py", "out[w] = maps[tokens].mean(0)", "out[w] = maps[tokens[0]]", "tests/test_captioner.py"),
 ("word probability = mean instead of product", "captioner/pipeline.py", "word_probs=[float(np.prod(maps.probs[g]))", "word_probs=[float(np.mean(maps.probs[g]))", "tests/test_methods.py"),
 ("beam score ignoring the length penalty", "captioner/fastdecode.py", "scores = top_scores / (cur_len ** length_penalty)", "scores = top_scores / cur_len", "tests/test_speed.py"),
 ("beam search keeping the worst continuations", "captioner/fastdecode.py", "keep = torch.topk(running_candidates, k=nb)[1]", "keep = torch.topk(running_candidates, k=nb, largest=False)[1]", "tests/test_speed.py"),
 ("early_stopping=True ignored", "captioner/fastdecode.py", "if not (can_improve.any() and not (is_finished.all() and early_stopping is True) and not done.all()):", "if not (can_improve.any() and not done.all()):", "tests/test_speed.py"),
 ("early_stopping='never' judged like False", "captioner/fastdecode.py", "length = max_length - 1 if early_stopping == \"never\" and length_penalty > 0.0 else cur_len - 1", "length = cur_len - 1", "tests/test_speed.py"),
 ("encoder relevance from the last layer only", "captioner/relevance.py", "r_ii = encoder_relevance([a[0].detach().float().mean(0) for a in enc.attentions])", "r_ii = encoder_relevance([a[0].detach().float().mean(0) for a in enc.attentions[-1:]])", "tests/test_rules.py"),
 ("bmm split drops the leftover rows", "captioner/kernels.py", "    if n < N:\n        out = torch.cat((out, w[n:] @ x.t()))  # (N, M)", "    if False:\n        out = torch.cat((out, w[n:] @ x.t()))  # (N, M)", "tests/test_speed.py"),
 ("the project's pixel limit raised tenfold", "captioner/images.py", "MAX_PIXELS = 40_000_000", "MAX_PIXELS = 400_000_000", "tests/test_robustness.py"),
 ("the file limit loosened to 60 MB", "captioner/images.py", "MAX_FILE_BYTES = 50_000_000", "MAX_FILE_BYTES = 60_000_000", "tests/test_robustness.py"),
 ("overlay heat resized with swapped axes", "captioner/render.py", "up = cv2.resize(heat.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)", "up = cv2.resize(heat.astype(np.float32).T, (w, h), interpolation=cv2.INTER_CUBIC)", "tests/test_render.py"),
 ("DeiT's distillation token kept on the grid", "captioner/layout.py", "    prefix = n - gh * gw\n", "    prefix = min(n - gh * gw, 1)\n", "tests/test_families.py"),
 ("overlay stretched over the whole photo despite a crop", "captioner/render.py", "    x0, y0, x1, y1 = view\n", "    x0, y0, x1, y1 = FULL_VIEW\n", "tests/test_render.py"),
 ("relevance maps with a word's tokens' gradients summed from the wrong row", "captioner/maps.py", "words = torch.stack([r_ti[w, g].sum(0)", "words = torch.stack([r_ti[w, [k + 1 for k in g]].sum(0)", "tests/test_rules.py"),
 ("/heatmap showing the previous word's map", "app.py", "        k = int(word_index)\n", "        k = max(int(word_index) - 1, 0)\n", "tests/test_app.py"),
 ("a click re-runs the model", "app.py", "        return (*views.word_view(state[\"result\"], k, grid), {**state, \"word\": k})", "        state = {**state, \"result\": loaded.get(state[\"model\"]).remap(state[\"result\"])}\n        return (*views.word_view(state[\"result\"], k, grid), {**state, \"word\": k})", "tests/test_app.py"),
 ("the grid checkbox re-maps", "app.py", "        return views.pictures(state[\"result\"], state[\"word\"], grid)", "        return views.pictures(loaded.get(state[\"model\"]).remap(state[\"result\"]), state[\"word\"], grid)", "tests/test_app.py"),
]
only = sys.argv[1:]
rows = []
for i, (name, path, old, new, tests) in enumerate(MUT):
    if only and str(i) not in only:
        continue
    dst = os.path.join(tempfile.gettempdir(), "captioner-mutant")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", "runs"))
    p = os.path.join(dst, path)
    s = open(p).read()
    assert s.count(old) == 1, (name, s.count(old))
    open(p, "w").write(s.replace(old, new))
    r = subprocess.run([f"{SRC}/.venv/bin/python", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", tests], cwd=dst,
                       capture_output=True, text=True)
    failed = [l.split(" - ")[0].replace("FAILED ", "") for l in r.stdout.splitlines() if l.startswith("FAILED")]
    rows.append((name, tests, "caught" if r.returncode else "NOT CAUGHT", failed[:1]))
    print(f"| {name} | {'caught by ' + failed[0] if failed else ('NOT CAUGHT' if r.returncode == 0 else r.stdout[-300:])} |", flush=True)
