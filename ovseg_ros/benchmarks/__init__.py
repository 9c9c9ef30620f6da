"""Engine benchmarks: latency matrix, peak memory, label agreement, per-step costs, text encoding.

`ovseg bench` (commands/bench.py) runs, in one process (engine_bench.run_engine_bench):

* the latency matrix (matrix.py): every method x input size x inference mode x variant, where a
  variant (variants.py) is one (device, precision, quantize, compile, threads) combination with a
  Segmenter of its own (reused over the methods, sizes and modes). Each row times
  `Segmenter.segment` on one random frame (fixed seed) after untimed warm-up frames and reports
  p50 / p95 latency, frames per second (1000 / mean latency) and the peak memory while the row
  ran (machine.py): the process's peak resident set (the Linux high-water mark, reset before each
  row) and, on CUDA, torch's peak allocated memory;
* the label agreement of every variant that is not fp32 eager (another precision, int8, compile)
  with the fp32 eager variant of the same device: the fraction of pixels with the same label on a
  few sample photos resized to the row's size;
* the per-step breakdown of one frame (steps.py: decode, resize, normalise, ViT, upsample,
  labels, copies, masks, overlay, messages: the functions the engine and the node call, timed one
  by one);
* text encoding of the 20 VOC classes with a template set (text.py): cold (full 77-token
  context), truncated (the context cut to the longest prompt) and from the disk cache.

The report is Markdown (report.py); `report.write_outputs` also writes bench.json and a PNG plot
(plot.py). `ovseg bench --against REV` (revision.py) times this checkout against a git revision;
`ovseg bench --node` (ros/bench_node.py) times the ROS node against the bare engine.
"""
