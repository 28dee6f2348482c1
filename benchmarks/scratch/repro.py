import sys, torch
sys.path.insert(0, ".")
from nsa_hf.kernels import nsa_decode, num_compressed_blocks
S = dict(compress_block_size=32, compress_stride=16, select_block_size=64, num_selected_blocks=16, window_size=512)
HQ, HKV, D, T, B = [int(x) for x in sys.argv[1:6]]
nc = num_compressed_blocks(T, 32, 16)
r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)
k, v, kc, vc = r(B, T, HKV, D), r(B, T, HKV, D), r(B, nc, HKV, D), r(B, nc, HKV, D)
q = r(B, 1, HQ, D); g = torch.rand(B, 1, HQ, 3, device="cuda", dtype=torch.bfloat16)
pos = torch.full((B, 1), T - 1, dtype=torch.int32, device="cuda")
o = nsa_decode(q, k, v, kc, vc, g, pos, **S); torch.cuda.synchronize(); print("ok", HQ, HKV, T, B, o.float().abs().mean().item())
