import time, mlx.core as mx
mx.set_default_device(mx.cpu)
s = mx.new_stream(mx.cpu)
a = mx.random.normal((512, 512)); mx.eval(a)
for n_ops in (5, 10, 20, 50, 100, 200):
    with mx.stream(s):
        x = a
        for _ in range(n_ops):
            x = (x @ a) * 0.01
    t0 = time.perf_counter(); mx.async_eval(x); t1 = time.perf_counter(); mx.eval(x); t2 = time.perf_counter()
    print(f"{n_ops} matmul+mul pairs ({2*n_ops} ops): async_eval {1000*(t1-t0):.1f} ms, then eval {1000*(t2-t1):.1f} ms")
