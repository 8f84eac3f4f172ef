"""Video I/O with PyAV: plan (one demux pass), decode a frame range, encode parts, join.

A video job is always: ``plan`` -> one or more parts (each ``VideoEncoder`` writes the frames of
one range, video only, with the source pts) -> ``join`` (remuxes the parts and every audio and
subtitle stream of the source into the output). The embedded default is the one-part case of the
distributed one, so both produce the same frame count, timing and audio packets.

Frames travel as I420 arrays (``(H * 3 // 2, W)`` uint8, the layout of PyAV's yuv420p
``to_ndarray``): frames without faces go back to the encoder untouched, and faces are written
back as a YUV delta, so pixels outside faces are exactly what a plain transcode would encode.

Rooms: ``probe`` (``plan``: one demux pass), ``decode`` (``iter_frames``), ``colour`` (I420
planes, the clip's Y'CbCr matrix, RGB changes written back), ``encode`` (``VideoEncoder``, one
part), ``remux`` (``join``: parts plus the source's audio and subtitles, and its timing checks).
"""
from .colour import (BT601, BT709, BT2020, FCC, SMPTE240M, RgbView, YuvMatrix, add_rgb_delta, i420_planes,
                     i420_shape, i420_to_rgb, source_range, yuv_matrix)
from .decode import iter_frames, to_i420
from .encode import EncoderSettings, VideoEncoder, count_frames, encoder_available, partial_name
from .probe import COLOR_TAGS, DEINTERLACE_MODES, VIDEO_EXTENSIONS, VideoPlan, is_video_path, plan, split
from .remux import MOV_EXTENSIONS, PCM_TO_AAC_EXTENSIONS, check_timing, join

__all__ = ["BT601", "BT709", "BT2020", "COLOR_TAGS", "DEINTERLACE_MODES", "FCC", "MOV_EXTENSIONS",
           "PCM_TO_AAC_EXTENSIONS", "SMPTE240M", "VIDEO_EXTENSIONS", "EncoderSettings", "VideoEncoder",
           "RgbView", "VideoPlan", "YuvMatrix", "add_rgb_delta", "check_timing", "count_frames",
           "encoder_available", "i420_planes", "i420_shape", "i420_to_rgb", "is_video_path", "iter_frames", "join",
           "partial_name", "plan", "source_range", "split", "to_i420", "yuv_matrix"]
