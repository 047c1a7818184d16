"""The demo's built-in text: enough to train a byte-level BPE tokenizer and to watch a loss go down."""

CORPUS = """\
A bridge carries weights from one shore to the other and back again without dropping a single one.
The model leaves the hub as a folder of safetensors files and arrives as shards laid out for tensor parallel ranks.
Every rank holds a slice of every matrix: the query groups it owns, its half of the gate and its half of the up projection.
The embedding table is padded so that every rank gets the same number of rows, and the padding is trimmed on the way home.
Pipeline stages hold consecutive layers; virtual chunks interleave them so that the bubbles in the schedule shrink.
A conversion is correct when the converted model computes the same function, not when the shapes line up.
So the bridge runs the same prompts through both models and compares the logits, token by token.
Training moves the weights a little at every step, and the loss goes down as the model learns the text.
When training is done the checkpoint goes back to the hub as a folder that transformers loads without any help.
The river is wide, the current is strong, and the engineers who built the bridge checked every bolt twice.
Memory stays flat while tensors stream through the converter one at a time, at the speed of the disk.
Nothing is left at random initialisation: every tensor that goes in comes out, and the names are listed when one does not.
The quick brown fox jumps over the lazy dog while the bridge hums quietly in the morning fog.
Numbers are measured, not guessed: tokens per second, memory per rank, and the ratio against a baseline in the same run.
"""
