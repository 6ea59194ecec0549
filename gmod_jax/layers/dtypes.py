"""Names of the dtype policy (config strings) mapped to jnp dtypes."""

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
