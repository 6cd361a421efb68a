;; needs_wasi: imports a function the mesh host does not provide. Deploying it must be
;; refused with the import's name.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "on_tick"))
)
