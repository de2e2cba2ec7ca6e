"""`vqbatch report`: one self-contained HTML page and a contact sheet that show a dataset to a person.

    published rows (local or s3://)      -> a seeded sample of the ok images, in dataset order
      -> report.html                     every sampled image inline (data: URIs) with its prompt, id and seed; each
                                         version's parameters and fingerprint; ok/error counts and the most frequent
                                         errors; images/s over the run and per actor as inline SVG plots
      -> contact_sheet.png               the same images in a grid, each captioned with prompt, id and seed

The page loads nothing from the network: no scripts, fonts or style sheets from elsewhere.
"""

from __future__ import annotations

import base64
import html
import io
import random
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from vqbatch.config import S3Config
from vqbatch.io.filesystems import is_s3
from vqbatch.io.formats import shard_format
from vqbatch.io.images import EXTENSIONS
from vqbatch.io.run_stats import read_run_stats
from vqbatch.io.dataset import CONTACT_SHEET_NAME, REPORT_DIR, REPORT_NAME, version_folder
from vqbatch.proof import StoredDataset

DEFAULT_SAMPLE = 48
ERRORS_SHOWN = 10  # most frequent error messages listed
MIME_TYPES = {name: f"image/{name}" for name in EXTENSIONS}  # by the stored `image_format`
SHEET_COLUMNS = 8
SHEET_IMAGE = 160  # pixels of each image's side on the contact sheet (small images are enlarged, pixels kept sharp)
SHEET_PROMPT_LINES = 3
SHEET_CAPTION_CHARACTERS = 26  # of the caption font, across one image
SHEET_FONT = "DejaVuSans.ttf"  # when the system has it (Debian's fonts-dejavu-core): accented, Greek, Cyrillic letters
SHEET_FONT_SIZE = 10
SHEET_LINE_HEIGHT = 12
SHEET_PAD = 8
PLOT_WIDTH, PLOT_HEIGHT = 520, 170
PLOT_COLOURS = ("#222222", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclass(frozen=True)
class Sample:
    """One image of the sample: its row and its encoded bytes."""

    row: dict
    data: bytes

    @property
    def mime_type(self) -> str:
        return MIME_TYPES[self.row["image_format"]]


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    contact_sheet: Path
    images: int  # images shown


def default_report_folder(output_uri: str) -> Path:
    """`<output>/report` for a local dataset; `./report` for an s3:// one (the page is opened on this machine)."""
    return Path(REPORT_DIR) if is_s3(output_uri) else Path(output_uri).expanduser() / REPORT_DIR


def write_report(output_uri: str, to: str | Path | None = None, sample: int = DEFAULT_SAMPLE, seed: int = 0,
                 s3: S3Config | None = None) -> ReportFiles:
    """Write `report.html` and `contact_sheet.png` for the published dataset at `output_uri` into `to`."""
    if sample < 1:
        raise ValueError(f"--sample must be a positive number of images, got {sample}")
    dataset = StoredDataset.open(output_uri, s3 or S3Config())
    folder = Path(to) if to is not None else default_report_folder(output_uri)
    folder.mkdir(parents=True, exist_ok=True)
    samples = load_samples(dataset, choose_rows(dataset.ok_rows(), sample, seed))
    page = folder / REPORT_NAME
    page.write_text(report_html(output_uri, dataset, samples), encoding="utf-8")
    sheet = folder / CONTACT_SHEET_NAME
    contact_sheet(samples).save(sheet)
    return ReportFiles(page, sheet, len(samples))


def choose_rows(ok_rows: pa.Table, sample: int, seed: int) -> pa.Table:
    """`sample` ok rows drawn with `seed` (all of them if fewer; none of a dataset without any), in dataset order."""
    chosen = sorted(random.Random(seed).sample(range(ok_rows.num_rows), min(sample, ok_rows.num_rows)))
    return ok_rows.take(pa.array(chosen, pa.int64())).select(["id", "prompt", "image_index", "seed", "image",
                                                              "image_format"])


def load_samples(dataset: StoredDataset, rows: pa.Table) -> list[Sample]:
    """Each row with its image's bytes, read where the dataset's format keeps them (files, tars or Parquet)."""
    location = dataset.location
    data = shard_format(dataset.output_format).image_bytes(location.filesystem, location.root, rows.select(["image"]))
    return [Sample(row, image) for row, image in zip(rows.to_pylist(), data)]


# ---------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 12px; }
figure.sample { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
figure.sample img { width: 100%; aspect-ratio: 1; object-fit: contain; image-rendering: pixelated; background: #eee; }
figcaption .prompt { display: block; margin: 4px 0 2px; }
figcaption .key { display: block; color: #666; font-size: 12px; font-family: ui-monospace, monospace; }
table { border-collapse: collapse; background: #fff; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f0f0f0; text-align: left; } .plots { display: flex; flex-wrap: wrap; gap: 16px; }
svg text { font: 11px system-ui, sans-serif; fill: #444; }
"""


def report_html(output_uri: str, dataset: StoredDataset, samples: list[Sample]) -> str:
    manifest = dataset.manifest
    sections = [
        f"<h1>{escape(output_uri)}</h1>",
        f"<p>{manifest['rows']} images: {manifest['ok']} ok, {manifest['errors']} failed; "
        f"{len(manifest['versions'])} version(s); published {escape(manifest['created'])}. "
        f"Showing {len(samples)} sampled ok images with their prompts.</p>",
        "<h2>Images</h2>",
        '<div class="grid">' + "".join(sample_figure(sample) for sample in samples) + "</div>",
        "<h2>Versions</h2>", versions_table(manifest["versions"]),
        "<h2>Errors</h2>", errors_section(dataset.metadata),
        "<h2>Speed</h2>", speed_section(dataset),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>vqbatch report: {escape(output_uri)}</title><style>{STYLE}</style></head>"
            f"<body>{''.join(sections)}</body></html>\n")


def escape(value) -> str:
    return html.escape(str(value), quote=True)


def sample_figure(sample: Sample) -> str:
    row = sample.row
    source = f"data:{sample.mime_type};base64,{base64.b64encode(sample.data).decode('ascii')}"
    key = f"{row['id']} · image {row['image_index']} · seed {row['seed']}"
    return (f'<figure class="sample" data-id="{escape(row["id"])}"><img src="{source}" alt="{escape(row["prompt"])}">'
            f'<figcaption><span class="prompt">{escape(row["prompt"])}</span>'
            f'<span class="key">{escape(key)}</span></figcaption></figure>')


def versions_table(versions: list[dict]) -> str:
    header = ("<tr><th>version</th><th>created</th><th>fingerprint</th><th>rows added</th><th>ok</th><th>failed</th>"
              "<th>model</th><th>sampling</th><th>encoding</th></tr>")
    rows = "".join(
        f"<tr><td>{entry['version']}</td><td>{escape(entry['created'])}</td><td><code>{escape(entry['fingerprint'])}"
        f"</code></td><td>{entry['rows_added']}</td><td>{entry['rows_ok']}</td><td>{entry['rows_failed']}</td>"
        f"<td>{escape(model_text(entry['fingerprint_parts']['model']))}</td>"
        f"<td>{escape(settings_text(entry['fingerprint_parts']['sampling']))}</td>"
        f"<td>{escape(settings_text(entry['fingerprint_parts']['encoding']))}</td></tr>"
        for entry in versions)
    return f"<table>{header}{rows}</table>"


def model_text(model: dict) -> str:
    """How the fingerprint names the model: a hub id and revision, or checkpoint files."""
    if model.get("kind") == "hub":
        return f"{model['id']} @ {model['revision']}, {model.get('dtype')}"
    if model.get("kind") == "files":
        return f"checkpoint of {len(model['files'])} files, {model.get('dtype')}"
    return f"{model.get('kind')}, {model.get('dtype')}"


def settings_text(settings: dict) -> str:
    return ", ".join(f"{name}={value}" for name, value in settings.items())


def errors_section(metadata: pa.Table) -> str:
    statuses = Counter(metadata.column("status").to_pylist())
    messages = Counter(error for error, status in zip(metadata.column("error").to_pylist(),
                                                      metadata.column("status").to_pylist()) if status == "error")
    counts = f"<p>{statuses.get('ok', 0)} ok, {statuses.get('error', 0)} errors.</p>"
    if not messages:
        return counts
    rows = "".join(f"<tr><td>{count}</td><td>{escape(message)}</td></tr>"
                   for message, count in messages.most_common(ERRORS_SHOWN))
    return f"{counts}<table><tr><th>rows</th><th>most frequent errors</th></tr>{rows}</table>"


def speed_section(dataset: StoredDataset) -> str:
    plots = []
    for entry in dataset.manifest["versions"]:
        stats = read_run_stats(dataset.location, version_folder(entry["version"]))
        if stats and stats["images_per_bin"]:
            plots.append(speed_plot(entry["version"], stats))
    if not plots:
        return "<p>No run timings recorded (versions written before vqbatch kept them, or published from a killed " \
               "run's files).</p>"
    return '<div class="plots">' + "".join(plots) + "</div>"


def speed_plot(version: int, stats: dict) -> str:
    """Images/s per time bin: all actors together and each actor, as step lines in one SVG."""
    width = stats["bin_seconds"]
    per_actor = {name: [count / width for count in counts] for name, counts in stats["images_per_bin"].items()}
    total = [sum(rates) for rates in zip(*per_actor.values())]
    series = {"all actors": total, **per_actor} if len(per_actor) > 1 else {"images/s": total}
    title = (f"version {version}: images/s over {stats['seconds']:.0f} s ({width:.1f} s bins), "
             f"{stats['actor_restarts']} actor restart(s)")
    return line_plot(title, series, width)


def line_plot(title: str, series: dict[str, list[float]], bin_seconds: float) -> str:
    left, bottom, top, right = 44, 28, 24, 110
    inner_w, inner_h = PLOT_WIDTH - left - right, PLOT_HEIGHT - top - bottom
    peak = max((value for values in series.values() for value in values), default=0.0) or 1.0
    bins = max(len(values) for values in series.values())

    def steps(index: int, value: float) -> str:  # the bin's rate across its width: a run of one bin is a line too
        y = top + inner_h * (1 - value / peak)
        return " ".join(f"{left + inner_w * edge / bins:.1f},{y:.1f}" for edge in (index, index + 1))

    parts = [f'<text x="{left}" y="14">{escape(title)}</text>',
             f'<line x1="{left}" y1="{top + inner_h}" x2="{left + inner_w}" y2="{top + inner_h}" stroke="#999"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + inner_h}" stroke="#999"/>',
             f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{peak:.2g}</text>',
             f'<text x="{left - 4}" y="{top + inner_h}" text-anchor="end">0</text>',
             f'<text x="{left + inner_w}" y="{PLOT_HEIGHT - 8}" text-anchor="end">{bins * bin_seconds:.0f} s</text>']
    for number, (name, values) in enumerate(series.items()):
        colour = PLOT_COLOURS[number % len(PLOT_COLOURS)]
        points = " ".join(steps(index, value) for index, value in enumerate(values))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="{2 if number == 0 else 1.2}" '
                     f'points="{points}"/>')
        parts.append(f'<text x="{left + inner_w + 8}" y="{top + 10 + 14 * number}" fill="{colour}">'
                     f'{escape(name)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{PLOT_WIDTH}" height="{PLOT_HEIGHT}" role="img" '
            f'aria-label="{escape(title)}">{"".join(parts)}</svg>')


# ---------------------------------------------------------------------------------------------------------------
# The contact sheet
# ---------------------------------------------------------------------------------------------------------------

def contact_sheet(samples: list[Sample]) -> Image.Image:
    """A grid of the sampled images, each above its prompt (wrapped), id, image index and seed."""
    columns = max(1, min(SHEET_COLUMNS, len(samples)))
    rows = max(1, -(-len(samples) // columns))
    cell_w = SHEET_IMAGE + 2 * SHEET_PAD
    cell_h = SHEET_IMAGE + SHEET_PAD * 2 + SHEET_LINE_HEIGHT * (SHEET_PROMPT_LINES + 2) + 4
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw, font = ImageDraw.Draw(sheet), caption_font()
    for number, sample in enumerate(samples):
        x, y = (number % columns) * cell_w + SHEET_PAD, (number // columns) * cell_h + SHEET_PAD
        image = thumbnail(sample.data)
        sheet.paste(image, (x, y))
        draw.rectangle((x - 1, y - 1, x + image.width, y + image.height), outline="#cccccc")
        for line_number, line in enumerate(caption_lines(sample.row)):
            draw.text((x, y + SHEET_IMAGE + 4 + line_number * SHEET_LINE_HEIGHT), line, fill="black", font=font)
    return sheet


def caption_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """`SHEET_FONT` from the system's font folders, else Pillow's own font (ASCII letters only: others show as
    boxes)."""
    try:
        return ImageFont.truetype(SHEET_FONT, SHEET_FONT_SIZE)
    except OSError:
        return ImageFont.load_default(SHEET_FONT_SIZE)


def thumbnail(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = SHEET_IMAGE / max(image.size)
    resample = Image.NEAREST if scale >= 1 else Image.LANCZOS  # enlarged pixels stay sharp squares
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, resample)


def caption_lines(row: dict) -> list[str]:
    """The prompt in at most `SHEET_PROMPT_LINES` lines (cut with an ellipsis), then the id and image, then the seed."""
    prompt = textwrap.wrap(row["prompt"], width=SHEET_CAPTION_CHARACTERS) or [""]
    if len(prompt) > SHEET_PROMPT_LINES:
        prompt = prompt[:SHEET_PROMPT_LINES - 1] + [prompt[SHEET_PROMPT_LINES - 1][:-1] + "…"]
    key = f"{row['id']} #{row['image_index']}"
    if len(key) > SHEET_CAPTION_CHARACTERS:
        key = key[:SHEET_CAPTION_CHARACTERS - 1] + "…"
    return prompt + [key, f"seed {row['seed']}"]
