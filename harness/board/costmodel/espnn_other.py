"""esp-nn's other int8 kernels on the ESP32-S3 that esp-tflite-micro 1.3.8 calls: FULLY_CONNECTED,
MAX_POOL_2D, AVERAGE_POOL_2D, element-wise ADD and MUL (same shapes only: a broadcast runs TFLM's
reference), and SOFTMAX. Instruction counts are read from the assembly (`src/fully_connected`,
`src/pooling`, `src/basic_math` of esp-nn 1.1.2 and 1.2.3) or estimated for its C, as in
docs/board-model.md ("Paths").
"""

from __future__ import annotations

from .work import Traffic, Window, Work, asm, ceil_to

__all__ = ["fully_connected_work", "pool_work", "ansi_pool_work", "elementwise_work", "softmax_work"]


def fully_connected_work(depth: int, units: int, rows: int, input_zero_point: int, version: str,
                         weight_bytes: int) -> Work:
    """esp_nn_fully_connected_(per_ch_)s8: one call per input row (fully_connected.cc:156-235)."""
    traffic = Traffic(activation_read=rows * depth, activation_write=rows * units, weight_read=weight_bytes,
                      weight_passes=rows)
    aligned_rows = depth % 16 == 0 or rows == 1
    if version == "1.1.2" or depth < 16 or not aligned_rows:
        # fully_connected_s8_esp32s3.S:100-141: s16 lanes, 8 MACs per 10 instructions, a
        # 10-instruction tail per leftover input and about 55 per output (scalar requantization).
        per_row = units * (10 * (depth // 8) + 10 * (depth % 8) + 55)
        return asm(f"esp-nn-{version}/fc_s16", rows * per_row, traffic, ceiling=0.8)
    # 1.2.3, fully_connected_esp32s3.c:52-125: an ACCX dot product (32 MACs per 8 instructions),
    # a C remainder over depth % 16, C requantization; with an input zero point the filter rows
    # are summed again in scalar C on every call (about 5 instructions per weight).
    per_row = units * (0.25 * (depth - depth % 16) + 7 * (depth % 16) + 60)
    filter_sums = 5 * depth * units if input_zero_point != 0 else 0
    return asm("esp-nn-1.2.3/fc_dot_s8", rows * (per_row + filter_sums), traffic, ceiling=4.0)


def pool_work(w: Window, kind: str, version: str) -> Work:
    """esp_nn_max_pool_s8 / esp_nn_avg_pool_s8 (channels a multiple of 4; pooling.cc:67-144)."""
    traffic = Traffic(activation_read=w.in_h * w.in_w * w.in_c, activation_write=w.pixels * w.out_c)
    if w.in_c % 4:
        return ansi_pool_work(w, kind, version)          # pooling.cc:78-89, 133-144
    lanes = 8 if w.in_c % 8 == 0 else 4
    groups = w.pixels * ceil_to(w.in_c, lanes) / lanes
    taps_per_pixel = w.valid_taps / max(1, w.pixels)
    rows_per_pixel = taps_per_pixel / max(1, w.f_w)
    if kind == "max":
        # max_pool_s8_esp32s3.S:165-215: 3 instructions per tap and 8 channels, 13 per filter
        # row, 21 per group, about 41 per output pixel (the 4-lane path: twice the groups).
        instructions = groups * (21 + rows_per_pixel * 13 + taps_per_pixel * 3) + w.pixels * 41
    else:
        # avg_pool_s8_esp32s3.S:241-404: 7 instructions per tap and 8 channels (widening adds),
        # 25 per filter row, 8 scalar divisions and rounding (about 62) per group.
        instructions = groups * (73 + rows_per_pixel * 25 + taps_per_pixel * 7) + w.pixels * 46
    return asm(f"esp-nn-{version}/{kind}_pool_{lanes}ch", instructions, traffic, ceiling=None)


def ansi_pool_work(w: Window, kind: str, version: str) -> Work:
    """esp-nn's ANSI C pools: a constant per tap, fitted on its ANSI C column (one row each)."""
    prefix = f"esp-nn-{version}/ansi"
    return Work(f"esp-nn-{version}/{kind}_pool_ansi", {f"{prefix}.{kind}_pool_tap": w.valid_taps * w.in_c},
                Traffic(activation_read=w.in_h * w.in_w * w.in_c, activation_write=w.pixels * w.out_c))


def elementwise_work(kind: str, elements: int, version: str) -> Work:
    """esp_nn_add_elementwise_s8 / esp_nn_mul_elementwise_s8 (add.cc:130-153, mul.cc:66-76):
    8 elements per iteration with scalar requantization of every lane (ADD: 291 instructions,
    add_s8_esp32s3.S:119-507; MUL: 123, mul_s8_esp32s3.S:99-240), leftovers one by one; fewer
    than 12 (ADD, .S:101) or 8 (MUL, .S:81) elements all one by one."""
    per_block, per_leftover, vector_from = (291, 76, 12) if kind == "add" else (123, 43, 8)
    blocks, leftover = divmod(elements, 8) if elements >= vector_from else (0, elements)
    return asm(f"esp-nn-{version}/{kind}_s8", blocks * per_block + leftover * per_leftover,
               Traffic(activation_read=2 * elements, activation_write=elements), ceiling=None)


def softmax_work(rows: int, depth: int, version: str) -> Work:
    """esp_nn_softmax_s8 (softmax.cc:64-83): C, per element a fixed-point exp (13 saturating
    64-bit high multiplies) and a rescale, per row a reciprocal (softmax_opt.c:71-107 in 1.1.2,
    softmax_s8_esp32s3.c:93-144 in 1.2.3)."""
    instructions = rows * (250 + depth * 330)
    return asm(f"esp-nn-{version}/softmax_c", instructions,
               Traffic(activation_read=rows * depth, activation_write=rows * depth, scratch=4 * depth), ceiling=None)
