"""esp-nn's int8 CONV_2D and DEPTHWISE_CONV_2D on the ESP32-S3, path by path, for the two esp-nn
versions the firmware can pin.

Each function mirrors one dispatch (esp-nn `src/convolution/esp_nn_conv_esp32s3.c` and
`esp_nn_depthwise_conv_s8_esp32s3.c` of 1.1.2 and 1.2.3; file:line references are to those) and
returns the `Work` of the routine it picks: instructions counted in the routine's assembly (or
estimated for its C) at one instruction per cycle, the per-call copies, and the bytes moved.
The instruction counts are the reading of the code in docs/board-model.md ("Paths"); the
measured kernel rows then fit one stall factor per path on top of them (`fit.py`).
"""

from __future__ import annotations

from .work import Traffic, Window, Work, asm, ceil_to

__all__ = ["conv_work", "depthwise_work", "ansi_conv_work", "ansi_depthwise_work"]

# Requantization, per output, inline in the filter-aligned kernel's assembly (.S:186-235).
ASM_REQUANT = 50
# The depthwise kernels requantize 4 lanes at a time with per-channel multipliers
# (esp_nn_multiply_by_quantized_mult_ver1_esp32s3.S: 102 instructions per 4 outputs).
DW_REQUANT_PER_4 = 103
# Byte copies done in C (padding, channel padding): about 1.5 instructions per byte with the
# memcpy/memset of newlib, per byte of the destination.
COPY_PER_BYTE = 1.5
COPY_PER_CALL = 50


def conv_work(w: Window, version: str) -> Work:
    """esp_nn_conv_s8_esp32s3 (1.1.2: .c:152-269; 1.2.3: .c:393-574)."""
    pointwise = (w.f_h, w.f_w, w.pad_h, w.pad_w, w.pad_end_h, w.pad_end_w, w.stride_h, w.stride_w) == (1, 1, 0, 0, 0, 0, 1, 1)
    if version != "1.1.2" and w.filter_c != w.in_c:
        return ansi_conv_work(w, "esp-nn-1.2.3/conv_grouped_ansi", version)
    if pointwise and w.in_c % 8 == 0:
        return _conv_1x1_mult8(w, version, w.in_c, prepass=0.0, scratch=0.0, copied=False)
    if pointwise and version == "1.1.2":
        # .c:202-222: input and filter copied with channels zero-padded to a multiple of 8.
        padded = ceil_to(w.in_c, 8)
        copies = (w.in_h * w.in_w + w.out_c) * (padded * COPY_PER_BYTE + COPY_PER_CALL)
        return _conv_1x1_mult8(w, version, padded, prepass=copies,
                               scratch=(w.in_h * w.in_w + w.out_c) * padded, copied=True)
    if pointwise:
        return _conv_1x1_c(w)
    if version != "1.1.2" and w.f_w * w.in_c < 16 <= w.taps * w.in_c:
        return _conv_im2col(w)
    return _conv_filter_aligned(w, version)


def _conv_1x1_mult8(w: Window, version: str, channels: int, prepass: float, scratch: float,
                    copied: bool) -> Work:
    # esp_nn_conv_s8_mult8_1x1_esp32s3.S: 8 pixels at a time, transposed to s16 (:99-134), then per
    # out-channel 8 channels x 8 pixels per 11 instructions (1.2.3: 14, unaligned filter loads),
    # and the 8 outputs requantized together (about 185 instructions); leftover pixels one by one.
    # The transposed block is one small buffer used again for every group: it stays cached.
    per_channel, leftover_per_channel = (1.375, 1.0) if version == "1.1.2" else (1.75, 1.375)
    groups, leftover = divmod(w.pixels, 8)
    instructions = (groups * (27 + 4.25 * channels + w.out_c * (185 + per_channel * channels))
                    + leftover * w.out_c * (86 + leftover_per_channel * channels))
    filter_bytes = channels * w.out_c
    lanes = w.in_c / channels
    return asm(f"esp-nn-{version}/conv_1x1_mult8", instructions + prepass,
                Traffic(activation_read=w.in_h * w.in_w * w.in_c, activation_write=w.pixels * w.out_c,
                        scratch=scratch, weight_read=filter_bytes, weight_passes=groups + leftover,
                        weights_in_arena=copied),
                ceiling=lanes * 8 / per_channel)


def _conv_1x1_c(w: Window) -> Work:
    # esp_nn_conv_s8_1x1_esp32s3.c:155-284 (1.2.3, channels not a multiple of 8): C transposes,
    # 64 MACs per about 35 instructions, scalar tail channels and scalar C requantization.
    groups, leftover = divmod(w.pixels, 8)
    blocks, tail = divmod(w.in_c, 8)
    instructions = (groups * (blocks * 320 + w.out_c * (420 + 35 * blocks + 48 * tail))
                    + leftover * w.out_c * (4 * w.in_c + 50))
    # Its best: the 8-pixel inner loops alone, 64 MACs per 35 instructions and 8 per 48 in the tail.
    return asm("esp-nn-1.2.3/conv_1x1_c", instructions,
                Traffic(activation_read=w.in_h * w.in_w * w.in_c, activation_write=w.pixels * w.out_c,
                        weight_read=w.in_c * w.out_c, weight_passes=groups + leftover),
                ceiling=8 * w.in_c / (35 * blocks + 48 * tail))


def _conv_im2col(w: Window) -> Work:
    # esp_nn_conv_esp32s3.c:177-313 (1.2.3): the window copied per pixel, then an ACCX dot
    # product of 16 MACs per 2 instructions over it, and C requantization per output. The window
    # buffer is reused for every pixel; the padded filter copy sits in scratch.
    window = w.taps * w.in_c
    aligned = ceil_to(window, 16)
    instructions = w.pixels * w.out_c * (73 + 2 * (aligned / 16 - 1)) + w.pixels * 30 * w.f_h
    prepass = w.out_c * (4 * window + 40)
    return asm("esp-nn-1.2.3/conv_im2col", instructions + prepass,
                Traffic(activation_read=w.in_h * w.in_w * w.in_c, activation_write=w.pixels * w.out_c,
                        scratch=w.out_c * aligned, weight_read=w.out_c * aligned, weight_passes=w.pixels,
                        weights_in_arena=True),
                ceiling=8 * window / aligned)


def _conv_filter_aligned(w: Window, version: str) -> Work:
    # esp_nn_conv_s8_filter_aligned_input_padded_esp32s3.S: out_y, out_x, out-channel, filter row;
    # a row is a dot product over fw x in_c bytes padded to 16, 32 MACs per 6 instructions
    # (:151-158), about 21 instructions around each row and 53 per output (requantization,
    # store); the whole filter is read again for every output pixel.
    row = ceil_to(w.f_w * w.in_c, 16)
    blocks = row // 16
    instructions = w.pixels * w.out_c * (3 + ASM_REQUANT + w.f_h * (21 + 3 * blocks)) + 16 * w.pixels
    aligned_filter = w.f_h * row * w.out_c
    prepass = 0.0
    realigned = (w.f_w * w.in_c) % 16 != 0
    if realigned:
        prepass += w.out_c * w.f_h * (40 + row)                     # rows realigned (.c:235-249)
    if version == "1.1.2" or w.input_zero_point != 0:
        prepass += 3.5 * aligned_filter + 10 * w.out_c              # filter sums for the offset
    scratch = 0.0
    if w.pad_h or w.pad_w:
        copied = w.padded_input_bytes                               # .c:520-527 (1.1.2: .c:255-262)
    elif version != "1.1.2" and any(w.espnn_pad_end):
        end_h, end_w = w.espnn_pad_end                              # 1.2.3 .c:528-536
        copied = (w.in_h + end_h) * (w.in_w + end_w) * w.in_c
    else:
        copied = 0
    if copied:
        prepass += copied * COPY_PER_BYTE + COPY_PER_CALL
        scratch = copied
    return asm(f"esp-nn-{version}/conv_filter_aligned", instructions + prepass,
                Traffic(activation_read=w.in_h * w.in_w * w.in_c, activation_write=w.pixels * w.out_c,
                        scratch=scratch + (aligned_filter if realigned else 0), weight_read=aligned_filter,
                        weight_passes=w.pixels, weights_in_arena=realigned),
                ceiling=32 / 6 * (w.f_w * w.in_c) / row)


def depthwise_work(w: Window, version: str) -> Work:
    """esp_nn_depthwise_conv_s8_esp32s3 (1.1.2: .c:424-543; 1.2.3: .c:471-809)."""
    mult, channels = w.multiplier, w.in_c
    three = (w.f_h, w.f_w) == (3, 3)
    if mult == 1 and channels % 8 == 0 and three:
        if channels % 16 == 0 and (w.pad_h, w.pad_w) in ((1, 1), (0, 0)):
            return _dw_mult1_3x3_s8(w, version, channels, extra=0.0)
        if version != "1.1.2" and channels >= 12:
            # .c:584-645: channels padded to 16 in C (the padded input included), the s8 kernel,
            # the output compacted.
            padded = ceil_to(channels, 16)
            copies = (w.in_h * w.in_w + w.pixels) * (25 + padded * COPY_PER_BYTE)
            return _dw_mult1_3x3_s8(w, version, padded, extra=copies, label="dw_mult1_3x3_s8_chpad16",
                                    pads_itself=False)
        return _dw_s16(w, version, "dw_mult1_3x3_s16", lanes=8, per_unit=350, per_row=0, per_tap=0)
    if mult == 1 and channels % 8 == 0:
        if version == "1.1.2":
            return ansi_depthwise_work(w, "esp-nn-1.1.2/dw_mult1_c", version)        # .c:505-510: scalar C
        input_bytes, filter_bytes = w.in_h * w.in_w * channels, w.taps * channels
        if 2 * (filter_bytes + input_bytes) <= 48 * 1024:
            return _dw_s16(w, version, "dw_mult1_s16", lanes=8, per_unit=294, per_row=34, per_tap=3)
        # .c:669-703: over 48 KB widened, the input rows each output row needs are widened in
        # scalar C (about 4 instructions an element) and the kernel called once per output row.
        rows = w.out_h * (w.f_h * w.in_w * channels * 4 + COPY_PER_CALL)
        return _dw_s16(w, version, "dw_mult1_s16_tiled", lanes=8, per_unit=294, per_row=34, per_tap=3,
                       extra=rows, widened=w.f_h * w.in_w * channels)
    if mult % 8 == 0:
        if three:
            return _dw_s16(w, version, "dw_mult8_3x3_s16", lanes=8, per_unit=375, per_row=0, per_tap=0)
        return _dw_s16(w, version, "dw_mult8_s16", lanes=8, per_unit=302, per_row=37, per_tap=6)
    if mult % 4 == 0:
        return _dw_s16(w, version, "dw_mult4_s16", lanes=4, per_unit=170, per_row=40, per_tap=6)
    if version != "1.1.2" and mult == 1 and channels > 3:
        # .c:706-779: scalar C conversion to s16 padded to 8 channels, the s16 kernel, compaction.
        padded = ceil_to(channels, 8)
        copies = w.in_h * w.in_w * padded * 6 + w.pixels * padded * 5
        return _dw_s16(w, version, "dw_mult1_chpad8_s16", lanes=8, per_unit=294, per_row=34, per_tap=3,
                       channels=padded, extra=copies)
    return ansi_depthwise_work(w, f"esp-nn-{version}/{'dw_c_unrolled' if version == '1.1.2' else 'dw_opt_c'}",
                               version)


def _dw_mult1_3x3_s8(w: Window, version: str, channels: int, extra: float,
                     label: str = "dw_mult1_3x3_s8", pads_itself: bool = True) -> Work:
    # esp_nn_depthwise_conv_s8_mult1_3x3_padded_esp32s3.S: per pixel and 16 channels, 9 vmulas
    # (25 instructions), QACC lane unpacking (92), 4 x ver1 requantization and the store; about
    # 578 instructions per 16 outputs. Works on a padded copy when the layer pads.
    units = w.pixels * channels / 16
    instructions = units * (25 + 92 + 4 * DW_REQUANT_PER_4 + 49) + (channels / 16) * 129
    prepass, scratch = extra, 0.0
    if pads_itself:
        prepass, scratch, label = _dw_padding(w, version, channels, prepass, label)
    return asm(f"esp-nn-{version}/{label}", instructions + prepass,
               Traffic(activation_read=w.in_h * w.in_w * w.in_c, activation_write=w.pixels * w.out_c,
                       scratch=scratch, weight_read=9 * channels),
               ceiling=144 / (25 + 92 + 4 * DW_REQUANT_PER_4 + 49) * w.in_c / channels,
               factor=f"esp-nn-{version}/dw_mult1_3x3_s8")


def _dw_padding(w: Window, version: str, channels: int, prepass: float, label: str) -> tuple[float, float, str]:
    """The copies the s8 3x3 branch makes before its kernel: (instructions, scratch bytes, path)."""
    padded_w = w.in_w + 2 * w.pad_w
    if (w.pad_h or w.pad_w) and version != "1.1.2" and w.padded_input_bytes > 40 * 1024:
        # 1.2.3 .c:528-563: a padded input over 40 KB is padded 3 rows at a time, and the kernel
        # called once per output row.
        per_row = w.f_h * padded_w * w.in_c * COPY_PER_BYTE + COPY_PER_CALL + 129 * channels / 16
        return prepass + w.out_h * per_row, w.f_h * padded_w * w.in_c, label + "_tiled"
    if w.pad_h or w.pad_w:
        return prepass + w.padded_input_bytes * COPY_PER_BYTE + COPY_PER_CALL, w.padded_input_bytes, label
    if any(w.espnn_pad_end):
        # The pad-0 branch pads the bottom and right itself (1.1.2 .c:483-490, 1.2.3 .c:570-576).
        end_h, end_w = w.espnn_pad_end
        copied = (w.in_h + end_h) * (w.in_w + end_w) * w.in_c
        return prepass + copied * COPY_PER_BYTE + COPY_PER_CALL, copied, label
    return prepass, 0.0, label


def _dw_s16(w: Window, version: str, label: str, *, lanes: int, per_unit: float, per_row: float,
            per_tap: float, channels: int | None = None, extra: float = 0.0, widened: int | None = None) -> Work:
    # The s16 depthwise kernels: input and filter widened to s16 in arena scratch first
    # (esp_nn_aligned_s8_to_s16_with_offset_esp32s3: 10 instructions per 32 bytes), then per pixel
    # and `lanes` outputs a fixed part (requantization dominates) plus per filter row and tap.
    # Taps outside the image are skipped. Unrolled 3x3 kernels fold rows and taps into per_unit.
    channels = channels or w.in_c
    outputs = w.pixels * channels * w.multiplier
    units = outputs / lanes
    rows_per_pixel = w.valid_taps / max(1, w.pixels) / max(1, w.f_w)   # average valid rows
    taps_per_pixel = w.valid_taps / max(1, w.pixels)
    instructions = units * (per_unit + rows_per_pixel * per_row + taps_per_pixel * per_tap)
    if widened is None:
        widened = w.in_h * w.in_w * channels
        prepass = widened * 10 / 32 + w.taps * channels * w.multiplier * 6 / 16 + extra
    else:                                 # widened tile by tile in C, counted in `extra`
        prepass = w.taps * channels * w.multiplier * 6 / 16 + extra
    ideal_unit = per_unit + w.f_h * per_row + w.taps * per_tap
    return asm(f"esp-nn-{version}/{label}", instructions + prepass,
                Traffic(activation_read=w.in_h * w.in_w * w.in_c, activation_write=w.pixels * w.out_c,
                        scratch=2 * widened, weight_read=2 * w.taps * channels * w.multiplier,
                        weights_in_arena=True),
                ceiling=lanes * w.taps / ideal_unit * w.in_c / channels,
               factor=f"esp-nn-{version}/{label.removesuffix('_tiled')}")


# esp-nn's scalar C kernels, which also stand for its ANSI C column: a constant per tap of the
# window that lands in the image (index arithmetic, two loads, a multiply-add) and per output
# (bounds, bit-exact requantization, store), fitted on the ANSI C column of the kernel table
# (fit.py) of the same esp-nn version.
def ansi_conv_work(w: Window, path: str, version: str) -> Work:
    prefix = f"esp-nn-{version}/ansi"
    return Work(path, {f"{prefix}.conv_tap": w.valid_taps * w.filter_c * w.out_c,
                       f"{prefix}.conv_output": w.pixels * w.out_c},
                Traffic(activation_read=w.in_h * w.in_w * w.in_c, activation_write=w.pixels * w.out_c,
                        weight_read=w.taps * w.filter_c * w.out_c, weight_passes=w.pixels),
                ceiling_term=f"{prefix}.conv_tap")


def ansi_depthwise_work(w: Window, path: str, version: str) -> Work:
    prefix = f"esp-nn-{version}/ansi"
    return Work(path, {f"{prefix}.dw_tap": w.valid_taps * w.out_c, f"{prefix}.dw_output": w.pixels * w.out_c},
                Traffic(activation_read=w.in_h * w.in_w * w.in_c, activation_write=w.pixels * w.out_c,
                        weight_read=w.taps * w.out_c),
                ceiling_term=f"{prefix}.dw_tap")
