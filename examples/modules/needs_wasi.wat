;; needs_wasi: a guest written against WASI preview1 rather than the mesh API. It writes
;; "wasi says hi" to stdout with fd_write on every tick; the host turns stdout lines into
;; log lines. It shows that WASI imports link (see docs/host-api.md for the subset).
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; One iovec at 0: 13 bytes at 16.
  (data (i32.const 0) "\10\00\00\00\0d\00\00\00")
  (data (i32.const 16) "wasi says hi\0a")
  (func (export "on_tick")
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 32))))
)
