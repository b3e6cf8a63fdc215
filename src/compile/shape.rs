//! The CAD model a compile produces: a CSG tree of [`Shape`]s and its
//! axis-aligned bounding box ([`Aabb`]).
//!
//! This is plain data with serde derives: it travels in `compiled` replies
//! and events and in the persisted compile cache. It owns the geometry
//! conventions (documented in `docs/protocol.md`) and must never know about
//! a scripting language. Children are shared (`Arc`), so building a tree
//! from parts never copies the parts.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One node of a CSG tree, tagged by `kind` on the wire:
/// `{kind: "translate", offset: [1, 0, 0], child: {kind: "cube", size: [1, 2, 3]}}`.
///
/// Conventions (as in OpenSCAD): a cube spans `[0, x] × [0, y] × [0, z]`; a
/// sphere is centred on the origin; a cylinder stands on the XY plane
/// around the Z axis, from `z = 0` to `z = height`; rotations are in
/// degrees, about X first, then Y, then Z (right-handed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Shape {
    Cube {
        size: [f64; 3],
    },
    Sphere {
        radius: f64,
    },
    Cylinder {
        radius: f64,
        height: f64,
    },
    Translate {
        offset: [f64; 3],
        child: Arc<Shape>,
    },
    Rotate {
        degrees: [f64; 3],
        child: Arc<Shape>,
    },
    Scale {
        factor: f64,
        child: Arc<Shape>,
    },
    /// Everything in any child.
    Union {
        children: Vec<Arc<Shape>>,
    },
    /// The first child minus everything in the others.
    Difference {
        children: Vec<Arc<Shape>>,
    },
    /// What is in every child.
    Intersection {
        children: Vec<Arc<Shape>>,
    },
}

/// An axis-aligned box `[min, max]` (per axis, `min <= max`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Aabb {
    pub min: [f64; 3],
    pub max: [f64; 3],
}

impl Aabb {
    fn empty() -> Aabb {
        Aabb {
            min: [f64::INFINITY; 3],
            max: [f64::NEG_INFINITY; 3],
        }
    }

    fn include(&mut self, point: [f64; 3]) {
        for (axis, value) in point.into_iter().enumerate() {
            self.min[axis] = self.min[axis].min(value);
            self.max[axis] = self.max[axis].max(value);
        }
    }

    fn union(self, other: Aabb) -> Aabb {
        let mut out = self;
        out.include(other.min);
        out.include(other.max);
        out
    }

    /// The overlap, or `None` when the boxes are disjoint.
    fn intersection(self, other: Aabb) -> Option<Aabb> {
        let mut out = self;
        for axis in 0..3 {
            out.min[axis] = self.min[axis].max(other.min[axis]);
            out.max[axis] = self.max[axis].min(other.max[axis]);
            if out.min[axis] > out.max[axis] {
                return None;
            }
        }
        Some(out)
    }
}

/// A 3×4 affine transform (rotation and uniform scale, then translation).
#[derive(Debug, Clone, Copy)]
struct Affine {
    m: [[f64; 3]; 3],
    t: [f64; 3],
}

impl Affine {
    const IDENTITY: Affine = Affine {
        m: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        t: [0.0; 3],
    };

    fn apply(&self, p: [f64; 3]) -> [f64; 3] {
        let mut out = self.t;
        for (row, o) in out.iter_mut().enumerate() {
            *o += self.m[row][0] * p[0] + self.m[row][1] * p[1] + self.m[row][2] * p[2];
        }
        out
    }

    /// `self ∘ inner`: first `inner`, then `self`.
    fn then(&self, inner: &Affine) -> Affine {
        let mut m = [[0.0; 3]; 3];
        for (r, row) in m.iter_mut().enumerate() {
            for (c, cell) in row.iter_mut().enumerate() {
                *cell = (0..3).map(|k| self.m[r][k] * inner.m[k][c]).sum();
            }
        }
        Affine {
            m,
            t: self.apply(inner.t),
        }
    }

    fn translation(offset: [f64; 3]) -> Affine {
        Affine {
            t: offset,
            ..Affine::IDENTITY
        }
    }

    fn scale(factor: f64) -> Affine {
        let f = factor;
        Affine {
            m: [[f, 0.0, 0.0], [0.0, f, 0.0], [0.0, 0.0, f]],
            t: [0.0; 3],
        }
    }

    /// Rotation about X, then Y, then Z, by degrees.
    fn rotation(degrees: [f64; 3]) -> Affine {
        let [ax, ay, az] = degrees.map(f64::to_radians);
        let (sx, cx) = ax.sin_cos();
        let (sy, cy) = ay.sin_cos();
        let (sz, cz) = az.sin_cos();
        let rx = [[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]];
        let ry = [[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]];
        let rz = [[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]];
        let r = |m| Affine { m, t: [0.0; 3] };
        r(rz).then(&r(ry)).then(&r(rx))
    }

    /// The length a unit length becomes (transforms here scale uniformly).
    fn scale_factor(&self) -> f64 {
        let column = [self.m[0][0], self.m[1][0], self.m[2][0]];
        column.iter().map(|v| v * v).sum::<f64>().sqrt()
    }
}

impl Shape {
    /// The smallest axis-aligned box around the shape, or `None` when it
    /// is certainly empty. Exact for primitives under any transform and for
    /// unions; for a difference it is the first child's box and for an
    /// intersection the overlap of the children's boxes, which contain the
    /// result but may be larger than it.
    pub fn bounding_box(&self) -> Option<Aabb> {
        self.bounds(&Affine::IDENTITY)
    }

    fn bounds(&self, at: &Affine) -> Option<Aabb> {
        match self {
            Shape::Cube { size } => {
                let mut out = Aabb::empty();
                for corner in 0..8 {
                    let pick = |axis: usize| {
                        if corner & (1 << axis) != 0 {
                            size[axis]
                        } else {
                            0.0
                        }
                    };
                    out.include(at.apply([pick(0), pick(1), pick(2)]));
                }
                Some(out)
            }
            Shape::Sphere { radius } => {
                let centre = at.apply([0.0; 3]);
                let r = radius * at.scale_factor();
                Some(Aabb {
                    min: centre.map(|c| c - r),
                    max: centre.map(|c| c + r),
                })
            }
            Shape::Cylinder { radius, height } => {
                // A disc of radius r with unit normal n spans r·√(1 − n_i²)
                // along axis i around its centre; the cylinder is the hull
                // of its two end discs.
                let bottom = at.apply([0.0; 3]);
                let top = at.apply([0.0, 0.0, *height]);
                let r = radius * at.scale_factor();
                let axis = [top[0] - bottom[0], top[1] - bottom[1], top[2] - bottom[2]];
                let length = axis.iter().map(|v| v * v).sum::<f64>().sqrt();
                let normal = if length > 0.0 {
                    axis.map(|v| v / length)
                } else {
                    // A flat cylinder: its normal is where Z went.
                    let z = [at.m[0][2], at.m[1][2], at.m[2][2]];
                    let n = z
                        .iter()
                        .map(|v| v * v)
                        .sum::<f64>()
                        .sqrt()
                        .max(f64::MIN_POSITIVE);
                    z.map(|v| v / n)
                };
                let reach = normal.map(|n| r * (1.0 - n * n).max(0.0).sqrt());
                let mut out = Aabb::empty();
                for end in [bottom, top] {
                    out.include([end[0] - reach[0], end[1] - reach[1], end[2] - reach[2]]);
                    out.include([end[0] + reach[0], end[1] + reach[1], end[2] + reach[2]]);
                }
                Some(out)
            }
            Shape::Translate { offset, child } => {
                child.bounds(&at.then(&Affine::translation(*offset)))
            }
            Shape::Rotate { degrees, child } => child.bounds(&at.then(&Affine::rotation(*degrees))),
            Shape::Scale { factor, child } => child.bounds(&at.then(&Affine::scale(*factor))),
            Shape::Union { children } => children
                .iter()
                .filter_map(|c| c.bounds(at))
                .reduce(Aabb::union),
            Shape::Difference { children } => children.first().and_then(|c| c.bounds(at)),
            Shape::Intersection { children } => {
                let mut boxes = children.iter().map(|c| c.bounds(at));
                let first = boxes.next().flatten()?;
                boxes.try_fold(first, |acc, b| acc.intersection(b?))
            }
        }
    }
}

/// A shape with the size of its tree, as scripts hold it: the counts let a
/// builder refuse a tree over the limits before it exists.
#[derive(Debug, Clone)]
pub struct Solid {
    pub shape: Arc<Shape>,
    /// Nodes in the tree (a part used twice counts twice: that is what
    /// the tree costs on the wire).
    pub nodes: u64,
    /// Levels of the tree (a primitive is 1).
    pub depth: u32,
}

impl Solid {
    pub fn primitive(shape: Shape) -> Solid {
        Solid {
            shape: Arc::new(shape),
            nodes: 1,
            depth: 1,
        }
    }

    /// A node over `children`, with its size.
    pub fn node(make: impl FnOnce(Vec<Arc<Shape>>) -> Shape, children: &[&Solid]) -> Solid {
        Solid {
            nodes: 1 + children.iter().map(|c| c.nodes).sum::<u64>(),
            depth: 1 + children.iter().map(|c| c.depth).max().unwrap_or(0),
            shape: Arc::new(make(children.iter().map(|c| c.shape.clone()).collect())),
        }
    }

    /// The size of a tree that was not built here (read back from a cache).
    pub fn measure(shape: Arc<Shape>) -> Solid {
        fn walk(shape: &Shape, depth: u32, nodes: &mut u64, deepest: &mut u32) {
            *nodes += 1;
            *deepest = (*deepest).max(depth);
            match shape {
                Shape::Cube { .. } | Shape::Sphere { .. } | Shape::Cylinder { .. } => {}
                Shape::Translate { child, .. }
                | Shape::Rotate { child, .. }
                | Shape::Scale { child, .. } => walk(child, depth + 1, nodes, deepest),
                Shape::Union { children }
                | Shape::Difference { children }
                | Shape::Intersection { children } => {
                    for child in children {
                        walk(child, depth + 1, nodes, deepest);
                    }
                }
            }
        }
        let (mut nodes, mut depth) = (0, 0);
        walk(&shape, 1, &mut nodes, &mut depth);
        Solid {
            shape,
            nodes,
            depth,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Aabb, min: [f64; 3], max: [f64; 3]) -> bool {
        let near = |x: f64, y: f64| (x - y).abs() < 1e-9;
        (0..3).all(|i| near(a.min[i], min[i]) && near(a.max[i], max[i]))
    }

    fn cube(x: f64, y: f64, z: f64) -> Arc<Shape> {
        Arc::new(Shape::Cube { size: [x, y, z] })
    }

    #[test]
    fn primitives_have_their_conventional_boxes() {
        let b = cube(1.0, 2.0, 3.0).bounding_box().expect("box");
        assert!(close(b, [0.0; 3], [1.0, 2.0, 3.0]), "{b:?}");
        let b = Shape::Sphere { radius: 2.0 }.bounding_box().expect("box");
        assert!(close(b, [-2.0; 3], [2.0; 3]), "{b:?}");
        let b = Shape::Cylinder {
            radius: 1.0,
            height: 5.0,
        }
        .bounding_box()
        .expect("box");
        assert!(close(b, [-1.0, -1.0, 0.0], [1.0, 1.0, 5.0]), "{b:?}");
    }

    #[test]
    fn transforms_move_scale_and_turn_boxes_exactly() {
        let moved = Shape::Translate {
            offset: [10.0, 0.0, -1.0],
            child: cube(1.0, 1.0, 1.0),
        };
        let b = moved.bounding_box().expect("box");
        assert!(close(b, [10.0, 0.0, -1.0], [11.0, 1.0, 0.0]), "{b:?}");

        let scaled = Shape::Scale {
            factor: 2.0,
            child: Arc::new(moved),
        };
        let b = scaled.bounding_box().expect("box");
        assert!(close(b, [20.0, 0.0, -2.0], [22.0, 2.0, 0.0]), "{b:?}");

        // A cylinder laid on its side by 90° about X points along -Y.
        let lying = Shape::Rotate {
            degrees: [90.0, 0.0, 0.0],
            child: Arc::new(Shape::Cylinder {
                radius: 1.0,
                height: 4.0,
            }),
        };
        let b = lying.bounding_box().expect("box");
        assert!(close(b, [-1.0, -4.0, -1.0], [1.0, 0.0, 1.0]), "{b:?}");

        // 90° about Z turns the cube's X extent into -Y... and Y into X.
        let turned = Shape::Rotate {
            degrees: [0.0, 0.0, 90.0],
            child: cube(2.0, 1.0, 1.0),
        };
        let b = turned.bounding_box().expect("box");
        assert!(close(b, [-1.0, 0.0, 0.0], [0.0, 2.0, 1.0]), "{b:?}");
    }

    #[test]
    fn booleans_combine_boxes() {
        let a = cube(2.0, 2.0, 2.0);
        let b = Arc::new(Shape::Translate {
            offset: [1.0, 1.0, 1.0],
            child: cube(2.0, 2.0, 2.0),
        });
        let union = Shape::Union {
            children: vec![a.clone(), b.clone()],
        };
        assert!(close(
            union.bounding_box().expect("box"),
            [0.0; 3],
            [3.0; 3]
        ));
        let inter = Shape::Intersection {
            children: vec![a.clone(), b.clone()],
        };
        assert!(close(
            inter.bounding_box().expect("box"),
            [1.0; 3],
            [2.0; 3]
        ));
        let diff = Shape::Difference {
            children: vec![a.clone(), b],
        };
        assert!(close(diff.bounding_box().expect("box"), [0.0; 3], [2.0; 3]));
        let far = Arc::new(Shape::Translate {
            offset: [10.0, 0.0, 0.0],
            child: a.clone(),
        });
        let disjoint = Shape::Intersection {
            children: vec![a, far],
        };
        assert_eq!(disjoint.bounding_box(), None);
    }

    #[test]
    fn solids_count_their_nodes_and_depth() {
        let leaf = Solid::primitive(Shape::Sphere { radius: 1.0 });
        let pair = Solid::node(|children| Shape::Union { children }, &[&leaf, &leaf]);
        assert_eq!((pair.nodes, pair.depth), (3, 2));
        let measured = Solid::measure(pair.shape.clone());
        assert_eq!((measured.nodes, measured.depth), (3, 2));
    }

    #[test]
    fn trees_travel_as_tagged_maps() {
        let shape = Shape::Translate {
            offset: [1.0, 2.0, 3.0],
            child: cube(1.0, 1.0, 1.0),
        };
        let bytes = rmp_serde::to_vec_named(&shape).expect("encode");
        let value: rmpv::Value = rmp_serde::from_slice(&bytes).expect("map");
        assert_eq!(value["kind"], rmpv::Value::from("translate"));
        assert_eq!(value["child"]["kind"], rmpv::Value::from("cube"));
        let back: Shape = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(back, shape);
    }
}
