import sys, time, statistics, torch, torch.nn.functional as F
import anypool
torch.set_num_threads(2)
op = sys.argv[1] if len(sys.argv) > 1 else "avg"
mode = sys.argv[2] if len(sys.argv) > 2 else "fwd"
CASES = [((32,512,14,14),(7,7)),((8,64,224,224),(7,7)),((64,2048,7,7),(1,1)),((8,256,64,64),(6,6)),
         ((8,64,100,100),(33,33)),((32,64,5,5),(7,7)),((16,256,37,53),(5,9)),
         ((1,2048,7,7),(1,1)),((1,512,14,14),(7,7)),((1,64,224,224),(7,7)),
         ((64,256,1000),(10,)),((64,256,1000),(333,)),((4,64,16,56,56),(4,7,7)),((2,32,9,33,33),(4,5,6))]
only = sys.argv[3] if len(sys.argv) > 3 else None
def t(fn, pre, reps=15):
    ts=[]
    for _ in range(reps):
        pre(); t0=time.perf_counter(); fn(); ts.append(time.perf_counter()-t0)
    return statistics.median(ts)*1e3
for cl in (False, True):
    for shape, out in CASES:
        if only and only not in str(shape): continue
        if cl and len(shape) == 3: continue
        x = torch.randn(shape)
        if cl: x = x.movedim(1,-1).contiguous().movedim(-1,1)
        nat = getattr(F, f"adaptive_{op}_pool{len(out)}d")
        ours = anypool.adaptive_avg_pool if op=="avg" else anypool.adaptive_max_pool
        s = torch.empty_like(x)
        pre = lambda: torch.clamp_min(x, 0, out=s)
        if mode == "fwd":
            fa = lambda: ours(x, out); fn = lambda: nat(x, out)
        else:
            xg = x.detach().requires_grad_()
            g = torch.ones_like(nat(x, out))
            fa = lambda: torch.autograd.grad(ours(xg, out), xg, g); fn = lambda: torch.autograd.grad(nat(xg, out), xg, g)
        fa(); fn()
        ra, rn = [], []
        for _ in range(3):
            ra.append(t(fa, pre)); rn.append(t(fn, pre))
        a, n = statistics.median(ra), statistics.median(rn)
        print(f"{str(shape):22} {str(out):10} {'cl' if cl else '  '}  any {a:8.3f}  nat {n:8.3f}  x{n/a:5.2f}", flush=True)
