"""Built-in offline probe set for ``mir-lightning evaluate``: nothing is downloaded.

Images are generated procedurally with numpy (seeded, so every run and every rank sees
the same set): sky-and-ground scenes, geometric shapes, stripes, checkerboards, smooth
colour fields and noise textures. Texts are English paragraphs written for this project,
combined in a fixed order so that each sample gets its own text. As in the paper's
protocol (TextVQA images paired with unrelated CNN/DailyMail stories), images and texts
are unrelated: MIR measures the distance between the two token distributions, not
image-text agreement.

These samples are synthetic. MIR values computed on them are comparable with each other
(same probe, different checkpoints), not with the values reported in the paper.

:func:`probe_set` pairs images and texts for ``evaluate``: the built-in set or the user's
files. Only paths and texts are held; each image is decoded when its batch needs it
(:meth:`ProbeSet.image`), so memory does not grow with the number of samples.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_SAMPLES",
    "PARAGRAPHS",
    "InputError",
    "ProbeSet",
    "load_texts",
    "probe_image_array",
    "probe_images",
    "probe_set",
    "probe_texts",
    "readable_image_paths",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class InputError(ValueError):
    """A problem with the user's input (paths, files, counts, model folder): the message says
    what to change. The command line prints it as one line and exits with code 2."""

MAX_SAMPLES = 500
"""Most samples the built-in probe set provides."""

IMAGE_SIZE = 256

PARAGRAPHS: tuple[str, ...] = (
    "The city council voted on Tuesday to extend the hours of the public library, which will now stay "
    "open until nine in the evening on weekdays. Supporters said students and shift workers had asked "
    "for the change for years.",
    "A small fishing boat that lost its engine off the northern coast was towed back to harbour late "
    "last night. The three crew members were tired and cold but unhurt, according to the coast guard.",
    "Researchers at a regional university have found that a common garden plant can remove some "
    "pollutants from indoor air. They caution that the effect is modest and that opening a window "
    "still works better.",
    "The local football club confirmed that its captain will miss the rest of the season with a knee "
    "injury. The coach said the team would miss his leadership more than his goals.",
    "Heavy rain flooded several streets in the old town on Sunday, and firefighters pumped water out "
    "of dozens of basements. Forecasters expect drier weather by the middle of the week.",
    "A bakery that has served the same neighbourhood for sixty years will close next month. The owner, "
    "who took over from her father, said rising costs and a lack of successors made the decision "
    "unavoidable.",
    "Engineers have begun repairing the old stone bridge over the river after inspectors found cracks "
    "in two of its arches. Traffic will be diverted for about four months while the work goes on.",
    "The museum opened an exhibition of maps drawn by sailors in the sixteenth century. Many of the "
    "coastlines are surprisingly accurate, while the interiors of the continents are filled with "
    "guesses and imaginary animals.",
    "Parents gathered outside the primary school to protest against plans to merge it with a larger "
    "school across town. The education department said no final decision has been made.",
    "A new study suggests that people who walk for twenty minutes a day sleep better than those who "
    "do not exercise at all. The authors say the timing of the walk matters less than its regularity.",
    "The orchestra announced its programme for the coming season, including two works by living "
    "composers and a complete cycle of the Beethoven symphonies spread over six concerts.",
    "Farmers in the valley say the late frost damaged much of this year's apple blossom. Some expect "
    "their harvest to be half of what it was last autumn, and prices in the shops may rise.",
    "Police are asking for witnesses after a van crashed into a shop window early on Saturday. No one "
    "was injured, and the driver stayed at the scene to speak with officers.",
    "The airport will add three new routes this summer, connecting the region with two coastal cities "
    "and a mountain resort. Airline officials said early bookings have been strong.",
    "A volunteer group has planted more than two thousand trees along the motorway to reduce noise "
    "for nearby houses. Residents say they already notice a difference on windy days.",
    "The technology company reported lower profits for the third quarter, blaming weaker demand for "
    "its tablets. Its shares fell sharply in early trading before recovering some of the loss.",
    "An elderly man who went missing while hiking in the forest was found safe the next morning by a "
    "search dog. He had sheltered under a rock overhang and kept warm with a foil blanket.",
    "The hospital has opened a new wing for children, with brightly painted rooms, a small garden and "
    "space for parents to stay overnight. Staff said it had been funded largely by donations.",
    "Astronomers observed a bright flash on the surface of the moon, probably caused by a small rock "
    "striking it at high speed. Such impacts are common but rarely seen from Earth.",
    "The bus company will replace half of its fleet with electric vehicles over the next three years. "
    "Charging points are being installed at the main depot this winter.",
    "Hundreds of runners took part in the charity race along the river, raising money for a local "
    "shelter. The winner finished the ten kilometre course in just over thirty-one minutes.",
    "A rare bird that usually lives much further south has been spotted in the wetlands near the "
    "estuary. Birdwatchers travelled from across the country hoping to photograph it.",
    "The government published a report on the state of the nation's roads, finding that one in five "
    "bridges needs major repairs within the next decade. Ministers promised additional funding.",
    "A chess club founded by two retired teachers now has more than eighty members, most of them "
    "under sixteen. The club meets every Thursday in the back room of a cafe.",
    "Scientists monitoring the glacier say it retreated by almost forty metres last year, faster than "
    "in any year since measurements began. Meltwater has formed a new lake at its foot.",
    "The theatre company is touring small villages with an open-air production of a classic comedy. "
    "Audiences are asked to bring their own chairs and, if the weather turns, an umbrella.",
    "A court ruled that the developer must restore a historic wall it demolished without permission. "
    "The company said it would appeal against the decision.",
    "Local shops reported a busy weekend as the annual street festival returned after a two-year "
    "break. Stalls sold food, crafts and second-hand books until late in the evening.",
    "The water company warned customers to use less water during the dry spell, asking them not to "
    "use garden hoses for the next few weeks. Reservoir levels are below average for the season.",
    "A team of students built a small satellite that will be launched next spring to measure the "
    "temperature of the upper atmosphere. It is about the size of a loaf of bread.",
    "After months of negotiations, the two unions and the rail operator reached an agreement on pay. "
    "Services are expected to return to their normal timetable from Monday.",
    "The zoo welcomed the birth of twin red panda cubs, which will stay with their mother out of "
    "public view for several weeks. Keepers say both cubs are feeding well.",
)


def probe_texts(n: int) -> list[str]:
    """``n`` distinct English texts (about 60-110 words each), deterministic.

    Text ``i`` joins three paragraphs chosen by a fixed rule; the first ``MAX_SAMPLES``
    texts are pairwise distinct.

    Raises:
        ValueError: when ``n`` is not in ``[1, MAX_SAMPLES]``.
    """
    _check_count(n, "texts")
    p = len(PARAGRAPHS)
    out = []
    for i in range(n):
        a = i % p
        b = (a + 1 + (i // p) % (p - 1)) % p
        c = (a + 1 + (3 * i + 7) % (p - 1)) % p
        if c == b:
            c = (c + 1) % p
        if c == a:
            c = (c + 1) % p
        out.append(" ".join((PARAGRAPHS[a], PARAGRAPHS[b], PARAGRAPHS[c])))
    return out


def _check_count(n: int, what: str) -> None:
    if not 1 <= int(n) <= MAX_SAMPLES:
        raise ValueError(f"the built-in probe set has {MAX_SAMPLES} {what}; asked for {n}")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled random grid in [0, 1], ``[size, size]`` float32."""
    grid = rng.random((cells + 1, cells + 1))
    t = np.linspace(0, cells, size, endpoint=False)
    i = t.astype(int)
    f = t - i
    g00 = grid[np.ix_(i, i)]
    g01 = grid[np.ix_(i, i + 1)]
    g10 = grid[np.ix_(i + 1, i)]
    g11 = grid[np.ix_(i + 1, i + 1)]
    fy, fx = f[:, None], f[None, :]
    top = g00 * (1 - fx) + g01 * fx
    bottom = g10 * (1 - fx) + g11 * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def probe_image_array(index: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """The ``index``-th procedural image, uint8 ``[size, size, 3]`` (RGB), deterministic."""
    rng = np.random.default_rng(1_000_003 + index)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = index % 6
    c1, c2, c3 = rng.random(3), rng.random(3), rng.random(3)
    if kind == 0:  # scene: sky gradient, hills, a sun
        horizon = 0.5 + 0.15 * (rng.random() - 0.5)
        hills = horizon + 0.08 * np.sin(2 * math.pi * (xx * rng.uniform(1, 3) + rng.random()))
        sky = (1 - yy[..., None]) * np.array([0.4, 0.6, 1.0]) + yy[..., None] * np.array([0.9, 0.9, 1.0])
        ground = c1 * 0.6 + np.array([0.1, 0.35, 0.1]) * 0.4
        img = np.where((yy > hills)[..., None], ground * (0.7 + 0.3 * _smooth_noise(rng, size, 16))[..., None], sky)
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3), rng.uniform(0.05, 0.1)
        sun = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        img = np.where(sun[..., None], np.array([1.0, 0.9, 0.3]), img)
    elif kind == 1:  # shapes on a background
        img = np.broadcast_to(c1 * 0.5 + 0.25, (size, size, 3)).copy()
        for _ in range(rng.integers(3, 8)):
            col = rng.random(3)
            cx, cy = rng.random(2)
            if rng.random() < 0.5:
                r = rng.uniform(0.05, 0.25)
                m = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
            else:
                w, h = rng.uniform(0.05, 0.4, 2)
                m = (abs(xx - cx) < w / 2) & (abs(yy - cy) < h / 2)
            img[m] = col
    elif kind == 2:  # stripes at an angle
        angle = rng.uniform(0, math.pi)
        freq = rng.uniform(3, 20)
        s = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))
        img = s[..., None] * c1 + (1 - s[..., None]) * c2
    elif kind == 3:  # checkerboard with a colour gradient
        n = int(rng.integers(2, 12))
        board = ((np.floor(xx * n) + np.floor(yy * n)) % 2)[..., None]
        grad = xx[..., None] * c3 + (1 - xx[..., None]) * c2
        img = board * c1 + (1 - board) * grad
    elif kind == 4:  # smooth colour field
        img = np.stack([_smooth_noise(rng, size, int(rng.integers(2, 6))) for _ in range(3)], axis=-1)
    else:  # textured noise
        base = _smooth_noise(rng, size, int(rng.integers(8, 32)))
        fine = rng.random((size, size)).astype(np.float32)
        t = (0.7 * base + 0.3 * fine)[..., None]
        img = t * c1 + (1 - t) * c2
    return (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)


def probe_images(n: int, size: int = IMAGE_SIZE) -> list:
    """``n`` procedural RGB ``PIL.Image`` objects of ``size x size`` pixels, deterministic.

    Raises:
        ValueError: when ``n`` is not in ``[1, MAX_SAMPLES]``.
    """
    from PIL import Image

    _check_count(n, "images")
    return [Image.fromarray(probe_image_array(i, size)) for i in range(n)]


# --------------------------------------------------------------------------- evaluation set
@dataclass(frozen=True)
class ProbeSet:
    """``len(texts)`` image+text samples; sample ``i`` is ``(image(i), texts[i])``.

    Attributes:
        texts: one text per sample.
        image_paths: one readable image file per sample, or ``None`` for the built-in
            procedural images.
        image_source, text_source: where they came from (for reports).
        skipped_images: ``"path: reason"`` of image files skipped as unreadable.
        skipped_texts: empty text files skipped.
    """

    texts: list[str]
    image_paths: list[Path] | None
    image_source: str
    text_source: str
    skipped_images: list[str] = field(default_factory=list)
    skipped_texts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def image(self, index: int) -> Any:
        """Sample ``index``'s image, decoded now, as an RGB ``PIL.Image``.

        Raises:
            InputError: when a file that passed the header check cannot be decoded.
        """
        from PIL import Image

        if self.image_paths is None:
            return Image.fromarray(probe_image_array(index))
        path = self.image_paths[index]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
            raise InputError(
                f"--images: {path} has a valid header but cannot be decoded ({type(exc).__name__}: {exc}); "
                "remove or replace it"
            ) from exc


def _image_files(source: Path) -> list[Path]:
    if not source.exists():
        raise InputError(f"--images: {source} does not exist")
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise InputError(f"--images: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {source}")
        return paths
    if source.suffix.lower() in (".txt", ".lst"):
        lines = [ln.strip() for ln in source.read_text(encoding="utf-8").splitlines()]
        paths = [Path(ln) if os.path.isabs(ln) else source.parent / ln for ln in lines if ln]
        if not paths:
            raise InputError(f"--images: the list {source} names no image")
        return paths
    return [source]


def readable_image_paths(source: Path, n: int) -> tuple[list[Path], list[str]]:
    """The first ``n`` image files of ``source`` (a folder sorted by name, one image, or a
    ``.txt`` list of paths) whose header PIL can read; nothing is decoded.

    Unreadable files (missing, not an image) are skipped with a warning. A file whose
    header reads but whose pixels do not decode fails later, in :meth:`ProbeSet.image`.

    Returns:
        ``(paths, skipped)``, ``skipped`` as ``"path: reason"``.

    Raises:
        InputError: when ``source`` is missing or holds fewer than ``n`` readable images.
    """
    from PIL import Image

    paths: list[Path] = []
    skipped: list[str] = []
    for path in _image_files(source):
        if len(paths) == n:
            break
        try:
            with Image.open(path) as im:
                im.verify()  # checks structure and checksums where the format has them; no pixels kept
            paths.append(path)
        except FileNotFoundError:
            skipped.append(f"{path}: missing")
            warnings.warn(f"skipping image {path}: file not found", stacklevel=2)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
            skipped.append(f"{path}: {type(exc).__name__}: {exc}")
            warnings.warn(f"skipping unreadable image {path} ({type(exc).__name__}: {exc})", stacklevel=2)
    if len(paths) < n:
        raise InputError(
            f"--num-samples {n} asks for {n} samples but only {len(paths)} readable images exist in "
            f"{source} ({len(skipped)} skipped); pass --num-samples {len(paths)} or add images"
            if paths
            else f"--images: no readable image in {source} ({len(skipped)} skipped)"
        )
    return paths, skipped


def _texts_from_file(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"--texts: {path} is not UTF-8 text ({exc})") from exc
    if not raw.strip():
        raise InputError(f"--texts: the text file {path} is empty")
    if path.suffix.lower() == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"--texts: {path} line {i} is not valid JSON ({exc.msg})") from exc
            text = obj.get("text") if isinstance(obj, dict) else obj if isinstance(obj, str) else None
            if not isinstance(text, str):
                raise InputError(f"--texts: {path} line {i} has no string field 'text'")
            if text.strip():
                texts.append(text.strip())
        return texts
    normalised = raw.replace("\r\n", "\n")
    blocks = [" ".join(b.strip().split("\n")).strip() for b in normalised.split("\n\n") if b.strip()]
    if len(blocks) > 1:
        return blocks
    return [ln.strip() for ln in normalised.splitlines() if ln.strip()]


def load_texts(source: Path, n: int) -> tuple[list[str], list[str]]:
    """The first ``n`` texts of ``source``: a folder of ``.txt`` files (one text each, empty
    ones skipped with a warning), a ``.jsonl`` file (one ``{"text": ...}`` per line), or a
    text file (blank-line separated paragraphs, else one text per line).

    Returns:
        ``(texts, skipped)``; ``skipped`` lists the empty files of a folder.

    Raises:
        InputError: for a missing source, an empty file, or fewer than ``n`` texts.
    """
    if not source.exists():
        raise InputError(f"--texts: {source} does not exist")
    skipped: list[str] = []
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
        if not files:
            raise InputError(f"--texts: no .txt files in {source}")
        texts = []
        for p in files:
            if len(texts) == n:
                break
            body = p.read_text(encoding="utf-8", errors="replace").strip()
            if body:
                texts.append(" ".join(body.split()))
            else:
                skipped.append(str(p))
                warnings.warn(f"skipping empty text file {p}", stacklevel=2)
        if not texts:
            raise InputError(f"--texts: every .txt file in {source} is empty")
    else:
        texts = _texts_from_file(source)
    if len(texts) < n:
        raise InputError(
            f"--num-samples {n} asks for {n} samples but only {len(texts)} texts exist in {source}; "
            f"pass --num-samples {len(texts)} or add texts"
        )
    return texts[:n], skipped


def probe_set(images: str | os.PathLike | None, texts: str | os.PathLike | None, n: int) -> ProbeSet:
    """Pair ``n`` images with ``n`` texts; the built-in set fills in what is not given.

    Raises:
        InputError: ``n < 1``, more samples than the sources hold, Pillow missing.
    """
    if n < 1:
        raise InputError(f"--num-samples must be at least 1, got {n}")
    if importlib.util.find_spec("PIL") is None:
        raise InputError("mir-lightning evaluate needs Pillow to read images: pip install pillow")
    if n < 20:
        warnings.warn(f"{n} samples: the paper reports MIR stable from about 20 samples on", stacklevel=2)
    if (images is None or texts is None) and n > MAX_SAMPLES:
        raise InputError(
            f"--num-samples {n} asks for {n} samples but the built-in probe set has "
            f"{MAX_SAMPLES}; pass --images and --texts for more"
        )
    if texts is not None:
        text_list, skipped_texts = load_texts(Path(texts), n)
        text_source = str(texts)
    else:
        text_list, skipped_texts, text_source = probe_texts(n), [], "built-in probe texts"
    if images is not None:
        paths, skipped = readable_image_paths(Path(images), n)
        image_source: str = str(images)
    else:
        paths, skipped, image_source = None, [], "built-in procedural images"
    return ProbeSet(text_list, paths, image_source, text_source, skipped, skipped_texts)
