"""Two tiny text-to-image denoisers whose concepts are planted, for the cross-attention analyses P077 and P109.

The task (`ConceptTask`): `concepts` visual concepts (think colour, shape, texture), each with `words` words; word w
of concept c has the id c·words + w. A prompt names one word of every concept, in a random order. The clean latent
image x₀ is a grid of grid × grid tokens of `concepts·width` channels; in every token, channel block c holds the
unit code u[c, w_c] of the prompt's word for concept c (fixed random vectors). So the words decide the image.

    x_t = α_t x₀ + σ_t ε,   α_t = cos(πt/2), σ_t = sin(πt/2), t ∈ (0, 1]
    the denoiser predicts x̂₀ = f(x_t, t, prompt); `generate` samples with deterministic DDIM from t = 1:
    ε̂ = (x_t − α_t x̂₀)/σ_t,   x_t' = α_t' x̂₀ + σ_t' ε̂   (t' = the next of `steps` equal steps down to 0)
    presence(x, c) = mean over tokens of cos(x[block c], u[c, w_c])   — 1: concept c as the prompt says it

`CrossAttentionDenoiser` (P077, a Stable-Diffusion-like cross-attention model): latent tokens → linear + learned
positions + a time embedding of (α_t, σ_t); `layers` blocks h ← h + CrossAttn(LN h, context = E[prompt]) (an attnlab
mechanism called with `context=`, so `capture` records its maps), h ← h + MLP(LN h); x̂₀ = linear(h). The context is
the word embeddings E (no text encoder). `planted_denoiser` sets its weights so that chosen heads carry chosen
concepts (module docstring of `planted_denoiser`); `train_denoiser` trains one from a seed in seconds.

`MMDiT` (P109, a tiny MM-DiT as in SD3/Flux double-stream blocks): image tokens (latents → linear + positions) and
prompt tokens (embedding) each have their own LayerNorm, q/k/v/out projections (an attnlab module per modality: its
`project`, `out_proj`) and MLP; one joint attention over [prompt; image] (Flux's order) through the image module's
core (`attend`, the mask contract's entry, so any registered mechanism with cross-attention serves). Deviations from
Flux: no timestep modulation (adaLN), no RoPE (learned positions), no QK-norm, no single-stream blocks.
`plant_similarity` ties the two modalities' weights and makes q = k = τ·O x (O orthogonal), so tokens attend to
tokens like them; `region_images` draws images whose regions are filled with the embeddings of concept words.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.errors import ParameterError, ShapeError
from ..core.registry import build as build_entry
from ..core.validate import check_int, is_int


def alpha(t: Tensor) -> Tensor:
    """α_t = cos(πt/2): the share of the clean latent in x_t."""
    return torch.cos(t * (math.pi / 2))


def sigma(t: Tensor) -> Tensor:
    """σ_t = sin(πt/2): the share of the noise in x_t."""
    return torch.sin(t * (math.pi / 2))


@dataclass(frozen=True)
class ConceptTask:
    """The synthetic text-to-image task (module docstring): `concepts` × `words` words, latent grid × grid tokens."""

    concepts: int = 3
    words: int = 4
    width: int = 4
    grid: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("concepts", "words", "width", "grid"):
            check_int(name, getattr(self, name), 1)
        check_int("seed", self.seed, 0)

    @property
    def vocab(self) -> int:
        return self.concepts * self.words

    @property
    def channels(self) -> int:
        return self.concepts * self.width

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    def codes(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        """u: (concepts, words, width) unit vectors, fixed by `seed`."""
        g = torch.Generator().manual_seed(self.seed)
        u = torch.randn(self.concepts, self.words, self.width, generator=g, dtype=torch.float64)
        return (u / u.norm(dim=-1, keepdim=True)).to(device=device, dtype=dtype)

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(prompt ids (batch, concepts), in a random order; the word of each concept (batch, concepts))."""
        check_int("batch", batch, 1)
        words = torch.randint(self.words, (batch, self.concepts), generator=generator)
        ids = words + torch.arange(self.concepts) * self.words
        order = torch.rand(batch, self.concepts, generator=generator).argsort(-1)
        return ids.gather(1, order), words

    def check_prompt(self, prompt: Tensor) -> None:
        if not isinstance(prompt, Tensor) or prompt.dtype != torch.long:
            got = f"dtype {prompt.dtype}" if isinstance(prompt, Tensor) else type(prompt).__name__
            raise TypeError(f"prompt: expected a LongTensor of word ids, got {got}")
        if prompt.dim() != 2 or prompt.shape[1] != self.concepts:
            raise ShapeError(f"prompt: expected (batch, {self.concepts}) ids, one word per concept, got {tuple(prompt.shape)}")
        if bool(((prompt < 0) | (prompt >= self.vocab)).any()):
            raise ValueError(f"prompt: expected ids in [0, {self.vocab}), got {prompt.min().item()}..{prompt.max().item()}")
        if not bool((torch.sort(prompt // self.words, dim=1).values == torch.arange(self.concepts)).all()):
            raise ValueError("prompt: expected one word of every concept in each prompt")

    def clean(self, words: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """x₀ (batch, tokens, channels): block c of every token is u[c, words[:, c]]."""
        u = self.codes(dtype, words.device)
        blocks = u[torch.arange(self.concepts, device=words.device), words]  # (batch, concepts, width)
        return blocks.reshape(words.shape[0], 1, self.channels).expand(-1, self.tokens, -1).contiguous()

    def presence(self, x: Tensor, words: Tensor) -> Tensor:
        """(batch, concepts): mean over tokens of cos(x[block c], u[c, w_c]) for latents x (batch, tokens, channels)."""
        if x.dim() != 3 or x.shape[1:] != (self.tokens, self.channels):
            raise ShapeError(f"x: expected latents (batch, {self.tokens}, {self.channels}), got {tuple(x.shape)}")
        blocks = x.reshape(x.shape[0], self.tokens, self.concepts, self.width)
        target = self.codes(x.dtype, x.device)[torch.arange(self.concepts, device=x.device), words]
        cos = nn.functional.cosine_similarity(blocks, target[:, None], dim=-1, eps=1e-12)
        return cos.mean(1)


class CrossAttentionDenoiser(nn.Module):
    """x̂₀ = f(x_t, t, prompt) with cross-attention from the latent tokens to the prompt's word embeddings."""

    def __init__(self, task: ConceptTask, *, dim: int = 32, layers: int = 2, heads: int = 4,
                 mechanism: str = "softmax", mlp: bool = True) -> None:
        super().__init__()
        check_int("dim", dim, 1)
        check_int("layers", layers, 1)
        check_int("heads", heads, 1)
        self.task, self.dim, self.heads = task, dim, heads
        self.words = nn.Embedding(task.vocab, dim)
        self.latent_in = nn.Linear(task.channels, dim)
        self.position = nn.Parameter(torch.randn(task.tokens, dim) * 0.02)
        self.time_in = nn.Linear(2, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.cross = nn.ModuleList(build_entry(mechanism, dim=dim, heads=heads) for _ in range(layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) if mlp
            else nn.Identity() for _ in range(layers)
        )
        self.has_mlp = mlp
        self.latent_out = nn.Linear(dim, task.channels)

    def context(self, prompt: Tensor) -> Tensor:
        """The cross-attention context of prompt ids (batch, m): the word embeddings (batch, m, dim)."""
        return self.words(prompt)

    def forward(self, x_t: Tensor, t: Tensor, prompt: Tensor) -> Tensor:
        """x_t (batch, tokens, channels), t (batch,) in [0, 1], prompt ids (batch, m) -> x̂₀ like x_t."""
        ctx = self.context(prompt)
        noise = torch.stack([alpha(t), sigma(t)], -1).to(x_t.dtype)
        h = self.latent_in(x_t) + self.position + self.time_in(noise)[:, None]
        for norm, cross, mlp in zip(self.norms, self.cross, self.mlps):
            h = h + cross(norm(h), context=ctx)
            if self.has_mlp:
                h = h + mlp(h)
        return self.latent_out(h)


def generate(model: nn.Module, prompt: Tensor, *, steps: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Deterministic DDIM from pure noise at t = 1 down to t = 0 in `steps` model calls: latents (batch, tokens, channels)."""
    check_int("steps", steps, 1)
    task: ConceptTask = model.task  # type: ignore[assignment]
    task.check_prompt(prompt)
    p = next(model.parameters())
    x = torch.randn(prompt.shape[0], task.tokens, task.channels, generator=generator, dtype=torch.float64)
    x = x.to(device=p.device, dtype=p.dtype)
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    prompt = prompt.to(p.device)
    for now, after in zip(times[:-1], times[1:]):
        t = torch.full((prompt.shape[0],), float(now), dtype=p.dtype, device=p.device)
        x0 = model(x, t, prompt)
        eps = (x - alpha(t)[:, None, None] * x0) / sigma(t)[:, None, None]
        x = float(alpha(after)) * x0 + float(sigma(after)) * eps
    return x


def train_denoiser(task: ConceptTask, *, steps: int = 300, batch: int = 32, lr: float = 3e-3, seed: int = 0,
                   **model_args: object) -> CrossAttentionDenoiser:
    """A `CrossAttentionDenoiser` trained from `seed`: AdamW at `lr`, `steps` steps of `batch` prompts, t ~ U(0.02, 1),
    loss ‖x̂₀ − x₀‖² (mean). A few seconds at the defaults on one core."""
    check_int("steps", steps, 1)
    check_int("batch", batch, 1)
    if not isinstance(lr, float) or not lr > 0:
        raise ParameterError(f"lr: expected a float > 0, got {lr!r}")
    torch.manual_seed(seed)
    model = CrossAttentionDenoiser(task, **model_args)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        prompt, words = task.sample(batch, g)
        x0 = task.clean(words)
        t = 0.02 + 0.98 * torch.rand(batch, generator=g)
        x_t = alpha(t)[:, None, None] * x0 + sigma(t)[:, None, None] * torch.randn(x0.shape, generator=g)
        loss = (model(x_t, t, prompt) - x0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def planted_denoiser(task: ConceptTask, planted: Mapping[tuple[int, int], int], *, layers: int = 3, heads: int = 4,
                     mechanism: str = "softmax", sharpness: float = 12.0, distractor: float = 0.3,
                     seed: int = 0) -> CrossAttentionDenoiser:
    """A `CrossAttentionDenoiser` (no MLP) whose head (layer, head) in `planted` carries concept `planted[...]`.

    Residual channels [0, channels) hold the prediction (x̂₀ = those channels), the latent input is written above
    them and never read. Word embeddings are orthonormal (dim = max(vocab, 2·channels) rounded up to the heads).
    A planted head of concept c: query = its bias r (all ones), key of word w = γ·r·[w ∈ c] (γ: q·k/√head_dim =
    `sharpness`), value of word w = u[c, w] for w ∈ c (else 0), out_proj writes the value into block c divided by the
    number of heads of c. So it attends to the prompt's word of c (softmax: logit `sharpness` against 0; linear
    attention: φ(q)·φ(k) large against φ(q)·1) and writes its code. Every other
    head is a distractor: random q, k, v (from the seed) and an out_proj of norm `distractor` into the prediction.
    """
    if not isinstance(planted, Mapping) or not planted:
        raise TypeError(f"planted: expected a non-empty mapping (layer, head) -> concept, got {planted!r}")
    for (layer, head), concept in planted.items():
        if not (is_int(layer) and 0 <= layer < layers and is_int(head) and 0 <= head < heads):
            raise ValueError(f"planted: expected (layer, head) in [0, {layers}) × [0, {heads}), got {(layer, head)!r}")
        if not (is_int(concept) and 0 <= concept < task.concepts):
            raise ValueError(f"planted: expected a concept in [0, {task.concepts}), got {concept!r} for {(layer, head)}")
    missing = set(range(task.concepts)) - set(planted.values())
    if missing:
        raise ValueError(f"planted: expected at least one head for every concept, none for {sorted(missing)}")
    dim = -(-max(task.vocab, 2 * task.channels, heads * task.width) // heads) * heads
    head_dim = dim // heads
    torch.manual_seed(seed)
    model = CrossAttentionDenoiser(task, dim=dim, layers=layers, heads=heads, mechanism=mechanism, mlp=False)
    g = torch.Generator().manual_seed(seed)
    ch = task.channels
    codes = task.codes(torch.float64)
    per_concept = {c: sum(1 for v in planted.values() if v == c) for c in range(task.concepts)}
    with torch.no_grad():
        embed = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0][: task.vocab]
        model.words.weight.copy_(embed)
        model.latent_in.weight.zero_()
        model.latent_in.weight[ch : 2 * ch] = torch.randn(ch, ch, generator=g) / math.sqrt(ch)
        model.latent_in.bias.zero_()
        model.position.zero_()
        model.time_in.weight.zero_()
        model.time_in.bias.zero_()
        model.latent_out.weight.zero_()
        model.latent_out.weight[:, :ch] = torch.eye(ch)
        model.latent_out.bias.zero_()
        r = torch.ones(head_dim, dtype=torch.float64)
        gain = sharpness / (r @ r) * math.sqrt(head_dim)  # q·k / √head_dim = sharpness for the planted words
        for layer, cross in enumerate(model.cross):
            for h in range(heads):
                rows = slice(h * head_dim, (h + 1) * head_dim)
                concept = planted.get((layer, h))
                if concept is None:
                    for proj in (cross.q_proj, cross.k_proj, cross.v_proj):
                        proj.weight[rows] = torch.randn(head_dim, dim, generator=g) / math.sqrt(dim)
                        proj.bias[rows] = 0.0
                    out = torch.randn(ch, head_dim, generator=g, dtype=torch.float64)
                    cross.out_proj.weight[:, rows] = 0.0
                    cross.out_proj.weight[:ch, rows] = out * (distractor / torch.linalg.matrix_norm(out, 2))
                    continue
                ids = torch.arange(concept * task.words, (concept + 1) * task.words)
                members = embed[ids].sum(0)  # Σ_{w ∈ c} e_w
                cross.q_proj.weight[rows] = 0.0
                cross.q_proj.bias[rows] = r
                cross.k_proj.weight[rows] = gain * torch.outer(r, members)
                cross.k_proj.bias[rows] = 0.0
                value = torch.zeros(head_dim, dim, dtype=torch.float64)
                value[: task.width] = codes[concept].T @ embed[ids]  # e_w -> u[c, w]
                cross.v_proj.weight[rows] = value
                cross.v_proj.bias[rows] = 0.0
                cross.out_proj.weight[:, rows] = 0.0
                block = slice(concept * task.width, (concept + 1) * task.width)
                cross.out_proj.weight[block, rows.start : rows.start + task.width] = torch.eye(task.width) / per_concept[concept]
            cross.out_proj.bias.zero_()
    return model.eval()


class MMDiTBlock(nn.Module):
    """A double-stream MM-DiT block: per-modality LayerNorm, projections (an attnlab module each) and MLP, one joint
    attention over [prompt; image]."""

    def __init__(self, dim: int, heads: int, *, mechanism: str = "softmax", mlp_ratio: int = 2) -> None:
        super().__init__()
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.img_attn = build_entry(mechanism, dim=dim, heads=heads)
        self.txt_attn = build_entry(mechanism, dim=dim, heads=heads)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.img_mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.txt_mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def project_image(self, img: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (batch, heads, n, head_dim) of image tokens, through the image stream's parameters."""
        return self.img_attn.project(self.img_norm1(img))

    def project_text(self, txt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of text tokens (the prompt, and ConceptAttention's concepts), through the prompt stream's parameters."""
        return self.txt_attn.project(self.txt_norm1(txt))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The attention core (the image module's mechanism) with heads merged: (batch, n_q, heads·head_dim)."""
        return self.img_attn.merge_heads(self.img_attn.attend(q, k, v))

    def image_update(self, img: Tensor, out: Tensor) -> Tensor:
        """img + W_o out, then + MLP(LN ·), with the image stream's parameters; out: attention outputs (merged heads)."""
        img = img + self.img_attn.out_proj(out)
        return img + self.img_mlp(self.img_norm2(img))

    def text_update(self, txt: Tensor, out: Tensor) -> Tensor:
        """The same residual update with the prompt stream's parameters."""
        txt = txt + self.txt_attn.out_proj(out)
        return txt + self.txt_mlp(self.txt_norm2(txt))

    def forward(self, img: Tensor, txt: Tensor) -> tuple[Tensor, Tensor]:
        qi, ki, vi = self.project_image(img)
        qt, kt, vt = self.project_text(txt)
        out = self.attend(torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2))
        n = txt.shape[1]
        return self.image_update(img, out[:, n:]), self.text_update(txt, out[:, :n])


class MMDiT(nn.Module):
    """Latents (batch, tokens, channels) and prompt ids (batch, m) -> latents, through `layers` `MMDiTBlock`s."""

    def __init__(self, *, channels: int, vocab: int, tokens: int, dim: int = 32, heads: int = 4, layers: int = 2,
                 mechanism: str = "softmax") -> None:
        super().__init__()
        for name, value in (("channels", channels), ("vocab", vocab), ("tokens", tokens), ("dim", dim),
                            ("heads", heads), ("layers", layers)):
            check_int(name, value, 1)
        self.channels, self.tokens, self.dim = channels, tokens, dim
        self.img_in = nn.Linear(channels, dim)
        self.position = nn.Parameter(torch.randn(tokens, dim) * 0.02)
        self.txt_in = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(MMDiTBlock(dim, heads, mechanism=mechanism) for _ in range(layers))
        self.img_out = nn.Linear(dim, channels)

    def embed_image(self, latents: Tensor) -> Tensor:
        if latents.dim() != 3 or latents.shape[1:] != (self.tokens, self.channels):
            raise ShapeError(f"latents: expected (batch, {self.tokens}, {self.channels}), got {tuple(latents.shape)}")
        return self.img_in(latents) + self.position

    def embed_text(self, ids: Tensor) -> Tensor:
        """Prompt (or concept) word ids (batch, m) -> text tokens (batch, m, dim)."""
        if not isinstance(ids, Tensor) or ids.dtype != torch.long or ids.dim() != 2:
            got = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
            raise TypeError(f"ids: expected a LongTensor (batch, m) of word ids, got {got}")
        return self.txt_in(ids)

    def streams(self, latents: Tensor, prompt: Tensor) -> tuple[Tensor, Tensor]:
        """The image and prompt streams after the last block."""
        img, txt = self.embed_image(latents), self.embed_text(prompt)
        for block in self.blocks:
            img, txt = block(img, txt)
        return img, txt

    def forward(self, latents: Tensor, prompt: Tensor) -> Tensor:
        return self.img_out(self.streams(latents, prompt)[0])


def plant_similarity(model: MMDiT, *, temperature: float = 2.0, value_scale: float = 1.0, mlp_scale: float = 0.1,
                     seed: int = 0) -> MMDiT:
    """Plant a text-image alignment in `model` (in place): per block, W_q = W_k = √temperature·O (O orthogonal, no
    bias), W_v = value_scale·O' (orthogonal), out_proj = O'' / 2, MLP weights scaled by `mlp_scale`, and the prompt
    stream a copy of the image stream; img_in = identity (channels = dim), positions 0. Image tokens then attend to
    tokens like them, in either modality."""
    if model.channels != model.dim:
        raise ValueError(f"model: plant_similarity needs channels == dim, got channels {model.channels} and dim {model.dim}")
    g = torch.Generator().manual_seed(seed)

    def orthogonal(n: int) -> Tensor:
        return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]

    with torch.no_grad():
        model.img_in.weight.copy_(torch.eye(model.dim))
        model.img_in.bias.zero_()
        model.position.zero_()
        for block in model.blocks:
            qk = orthogonal(model.dim) * math.sqrt(temperature)
            attn = block.img_attn
            attn.q_proj.weight.copy_(qk)
            attn.k_proj.weight.copy_(qk)
            attn.v_proj.weight.copy_(orthogonal(model.dim) * value_scale)
            attn.out_proj.weight.copy_(orthogonal(model.dim) / 2)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                proj.bias.zero_()
            for layer in block.img_mlp:
                if isinstance(layer, nn.Linear):
                    layer.weight.mul_(mlp_scale)
                    layer.bias.zero_()
            block.txt_attn.load_state_dict(block.img_attn.state_dict())
            block.txt_mlp.load_state_dict(block.img_mlp.state_dict())
    return model


def region_images(embeddings: Tensor, layouts: Tensor, *, noise: float = 0.3,
                  generator: torch.Generator | None = None) -> Tensor:
    """Latents (batch, tokens, dim): token i of image b is embeddings[layouts[b, i]] + noise·N(0, 1/dim).

    embeddings: (concepts, dim), e.g. the text embeddings of concept words; layouts: (batch, tokens) concept index per
    token (the planted segmentation)."""
    if embeddings.dim() != 2:
        raise ShapeError(f"embeddings: expected (concepts, dim), got {tuple(embeddings.shape)}")
    if layouts.dtype != torch.long or layouts.dim() != 2:
        raise TypeError(f"layouts: expected a LongTensor (batch, tokens), got {layouts.dtype} of shape {tuple(layouts.shape)}")
    if bool(((layouts < 0) | (layouts >= embeddings.shape[0])).any()):
        raise ValueError(f"layouts: expected concept indices in [0, {embeddings.shape[0]}), got {layouts.min()}..{layouts.max()}")
    dim = embeddings.shape[1]
    jitter = torch.randn(*layouts.shape, dim, generator=generator, dtype=torch.float64) * (noise / math.sqrt(dim))
    return embeddings[layouts] + jitter.to(embeddings)


def quadrant_layouts(grid: int, assignments: Sequence[Sequence[int]]) -> Tensor:
    """Layouts (batch, grid²): the four quadrants of a grid × grid image get the concepts of each assignment (4 ints,
    in the order top-left, top-right, bottom-left, bottom-right)."""
    check_int("grid", grid, 2)
    if grid % 2:
        raise ValueError(f"grid: expected an even size, got {grid}")
    rows = torch.arange(grid)[:, None].expand(grid, grid)
    cols = torch.arange(grid)[None, :].expand(grid, grid)
    quadrant = ((rows >= grid // 2).long() * 2 + (cols >= grid // 2).long()).reshape(-1)
    out = []
    for a in assignments:
        if len(a) != 4 or not all(is_int(c) and c >= 0 for c in a):
            raise ValueError(f"assignments: expected 4 concept indices per image, got {a!r}")
        out.append(torch.tensor(list(a))[quadrant])
    return torch.stack(out)
