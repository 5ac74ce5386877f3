"""What planning a folder of images prints besides the plan: files skipped, formats the export
cannot decode, several sizes, EXIF rotations, 12-bit data (from the options `plan_folder` records)."""

from __future__ import annotations

from kcp.core.sources.base import SourcePlan
from kcp.core.sources.images import DEFAULT_MAX_SIDE


def folder_warning_lines(plan: SourcePlan) -> list[str]:
    """Lines for a folder: the most common size scaled down to 256 a side; its sampled images of
    several sizes, all resized (stretched) to the most common one, a warning when that is a minority's; its sampled photos whose EXIF says to rotate
    them, which neither training nor the export's decoder does (tf.io.decode_jpeg does not); its
    sampled 16-bit gray images that hold values below 4096 (12-bit data, as microscopes and
    scanners save it): read as their high byte, as the export's decoder reads them, they keep 16
    levels or fewer."""
    lines, options = [], plan.options if plan.kind == "folder" else {}
    if options.get("capped"):
        height, width = plan.input_spec.shape[:2]
        lines.append(f"the most common image size, {options['capped'][0]}x{options['capped'][1]}, is above "
                     f"{DEFAULT_MAX_SIDE} a side: "
                     f"images are resized to {height}x{width}; choose the size with data.image_size=[HEIGHT, WIDTH]")
    if options.get("mixed_sizes"):
        share, sampled, kinds = options["mixed_sizes"]
        height, width = plan.input_spec.shape[:2]
        lines.append(f"{'warning: ' if 2 * share < sampled else ''}the {sampled} sampled images have {kinds} sizes: "
                     f"all are resized to {height}x{width}, the most common{' scaled down' * bool(options.get('capped'))} "
                     f"({share} of them), the aspect ratio not "
                     "kept; choose the size with data.image_size=[HEIGHT, WIDTH]")
    if options.get("rotated"):
        rotated, sampled = options["rotated"]
        lines.append(f"warning: {rotated} of the {sampled} sampled images carry an EXIF orientation (a phone's "
                     "photos): it is not applied, in training or by the export's decoder, as tf.io.decode_jpeg does "
                     "not, so they are read as stored, turned; rotate them first (PIL.ImageOps.exif_transpose)")
    if options.get("narrow_16_bit"):
        count, largest = options["narrow_16_bit"]
        lines.append(f"warning: the {count} sampled 16-bit gray images hold values up to {largest} only: they are "
                     f"read as 8 bits by their high byte (v >> 8), as the export's PNG decoder reads them, which leaves "
                     f"{(largest >> 8) + 1} levels; scale them to 0..65535 or to 8 bits first (e.g. x * (65535 // x.max()))")
    return lines


def unserved_line(plan: SourcePlan) -> str | None:
    """A warning for a folder whose images read include .webp/.tif/.tiff files: they train, but the
    export's image_bytes input decodes PNG, JPEG, GIF and BMP only. None otherwise."""
    unserved = plan.options.get("unserved") if plan.kind == "folder" else None
    if not unserved:
        return None
    return (f"warning: {unserved} of the {plan.estimated_count} images read are .webp/.tif/.tiff files "
            f"(e.g. {', '.join(plan.options['unserved_examples'])}): they train, but the export's image_bytes "
            "input decodes PNG/JPEG/GIF/BMP only, so such files cannot be sent to the served model "
            "(convert them; serve_images takes decoded pixels)")


def skipped_line(plan: SourcePlan) -> str | None:
    """"skipped: N files, not images by their extension (not read), e.g. …" for a folder with such
    files (preprocess and batch prediction print it after the plan); None when there is none."""
    skipped = plan.options.get("skipped") if plan.kind == "folder" else None
    if not skipped:
        return None
    what = "file, not an image by its" if skipped == 1 else "files, not images by their"
    return f"skipped: {skipped} {what} extension (not read), e.g. {', '.join(plan.options['skipped_examples'])}"
