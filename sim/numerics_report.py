"""Measure the numerics against float64; the figures in docs/numerics.md come from this script.

Run: ``python -m kvoverlay.sim.numerics_report``
"""
import math

import numpy as np

from kvoverlay import numerics as nx

R=np.random.default_rng(0)
def rel(g,r): return float(np.max(np.abs(g-r))/np.max(np.abs(r)))
x=R.normal(0,3,4096); m,e=nx.from_float(x); print("from_float", rel(nx.to_float(m,e),x))
a,ea=nx.from_float(R.normal(0,2,4096)); b,eb=nx.from_float(R.normal(0,.01,4096))
fa,fb=nx.to_float(a,ea),nx.to_float(b,eb)
print("vadd",rel(nx.to_float(*nx.vadd(a,ea,b,eb)),fa+fb)); print("vmul",rel(nx.to_float(*nx.vmul(a,ea,b,eb)),fa*fb))
g,eg=nx.from_float(1+.1*R.normal(size=4096)); fg=nx.to_float(g,eg); eps=41943*2.0**-32
print("rmsnorm",rel(nx.to_float(*nx.norm(a,ea,g,eg,41943,-32,"rms")),fa/np.sqrt(np.mean(fa**2)+eps)*fg))
print("layernorm",rel(nx.to_float(*nx.norm(a,ea,g,eg,41943,-32,"layer")),(fa-fa.mean())/np.sqrt(fa.var()+eps)*fg))
xs,ex=nx.from_float(np.linspace(-20,20,40001)); fx=nx.to_float(xs,ex)
gates={"silu":lambda v:1/(1+np.exp(-v)),"gelu_erf":lambda v:0.5*(1+np.vectorize(math.erf)(v/math.sqrt(2))),"gelu_tanh":lambda v:0.5*(1+np.tanh(math.sqrt(2/math.pi)*(v+0.044715*v**3)))}
for k,f in gates.items(): print(k, float(np.max(np.abs(nx.to_float(*nx.act(xs,ex,k))-fx*f(fx)))))
d=-np.arange(0,20<<16,7,dtype=np.int64); print("exp", float(np.max(np.abs(nx.exp2_neg_q15(d)/32768-np.exp(d/65536)))))
w=R.normal(0,.05,(256,1024))
for fmt in ["int8","int4","w16","uint4"]:
  for meth in ["rtn","mse"]:
    q,sm,se=nx.quantize_matrix(w,fmt,32,meth); print(fmt,meth,"rel rms err", float(np.sqrt(np.mean((nx.dequantize_matrix(q,sm,se,32,fmt)-w)**2))/np.sqrt(np.mean(w**2))))
