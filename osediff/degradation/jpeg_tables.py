"""The JPEG quantisation tables and their two orientations (spec §4.3 "DiffJPEG"); torch-free, so the CLI can
name the choices without importing torch.

ITU-T T.81 Annex K prints each table with row = vertical frequency, column = horizontal frequency, and libjpeg
stores and applies them that way. The authors' training data come from BasicSR's DiffJPEG, which divides the
coefficient at (vertical u, horizontal v) by the entry printed at (v, u): the tables transposed. The chrominance
table is symmetric, so only the luminance table changes. Two names, one per orientation:

    reference   transposed, as the authors' DiffJPEG: the default of `osediff train` and `osediff degrade`
    standard    as printed, as libjpeg and so real JPEG files

Measured (`benchmarks/bench_jpeg_tables.py`, first 16 RealSR HR images, Pillow 12.3 / libjpeg-turbo): our
round trip in the "standard" orientation is closer to libjpeg's decode at every quality and on every image,
see `MEASURED` and README "Train".
"""

from __future__ import annotations

from typing import Literal, get_args

JpegTables = Literal["reference", "standard"]
JPEG_TABLES: tuple[str, ...] = get_args(JpegTables)

# ITU-T T.81 Annex K, tables K.1 (luminance) and K.2 (chrominance) as printed; row = vertical frequency.
LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
) + ((99,) * 8,) * 4

# Median PSNR (dB) of our round trip to Pillow/libjpeg's decode, (quality, gray standard, gray reference,
# colour standard, colour reference); gray = flat chroma, only the luminance table at work.
MEASURED = (
    (30, 44.34, 38.47, 41.15, 37.49),
    (50, 54.90, 41.41, 44.68, 40.12),
    (75, 51.70, 44.42, 44.50, 42.13),
    (95, 52.36, 49.17, 46.22, 45.26),
)


def base_tables(tables: JpegTables) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """The (luminance, chrominance) base tables, 8×8 nested tuples indexed [vertical][horizontal] frequency,
    in the orientation `tables` names (quality 50, before the IJG scaling)."""
    if tables not in JPEG_TABLES:
        raise ValueError(f"jpeg tables must be one of {JPEG_TABLES}, got {tables!r}")
    if tables == "standard":
        return LUMA_TABLE, CHROMA_TABLE
    return tuple(zip(*LUMA_TABLE)), tuple(zip(*CHROMA_TABLE))


def _measured_text() -> str:
    rows = "; ".join(f"q{q} {gs:.1f}/{gr:.1f} (colour {cs:.1f}/{cr:.1f})" for q, gs, gr, cs, cr in MEASURED)
    return f"median PSNR to libjpeg's decode, standard/reference, gray images: {rows} dB"


JPEG_TABLES_HELP = ("orientation of the JPEG quantisation tables in the Real-ESRGAN degradation: 'reference' = "
                    "transposed, as the authors' DiffJPEG made their training data; 'standard' = as printed in "
                    "T.81 Annex K, what libjpeg writes into real JPEG files (" + _measured_text() + ").")
